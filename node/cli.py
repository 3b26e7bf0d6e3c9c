"""`ntm`: the node's command line. Human-readable output by default, `--json` for scripts.

Exit codes: 0 ok, 1 refused or failed (the message says why), 2 usage or local file problems.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from urllib.parse import urlsplit

from node import state
from node.agent import Node, Tunnel, local_addrs_towards
from node.dc_client import DcClient, DcError, dc_url
from daemon import keystore
from daemon.service import BackgroundTasks
from ntm import keys, messages, record
from ntm.errors import KeystoreError, NtmError
from ntm.registration import RegistrationRequest
from ntm.tunnel import TunnelError

TUNNEL_PORT = 4330  # the seeds' NTM port
AGENT_STALE_S = 5.0  # `ntm listen` rewrites its status every second; older means it is gone


class CliError(Exception):
    """A failure to report as one line and exit code `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def load_key(base: Path):
    try:
        return keystore.load_keystore(base / state.KEY_FILE, state.passphrase())
    except KeystoreError as exc:
        raise CliError(str(exc), 2) from None


def pick_dc(args, base: Path, st: dict) -> str:
    spec = args.dc or st.get("dc_url") or state.default_dc(base)
    if not spec:
        raise CliError("no DC given: use --dc HOST[:PORT] (or start `ntm devnet` to get a default)", 2)
    try:
        return dc_url(spec)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None


def out(args, data: dict, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


async def cmd_keygen(args, base: Path) -> None:
    path = base / state.KEY_FILE
    if path.exists() and not args.force:
        raise CliError(f"{path} exists; use --force to replace it (the old node ID is lost)", 2)
    key = keys.generate()
    keystore.save_keystore(key, path, state.passphrase())
    nid = keys.checksum(keys.node_id_of(key))
    out(args, {"node": nid, "key_file": str(path)}, f"new node key in {path}\nnode ID {nid}")


async def cmd_id(args, base: Path) -> None:
    key = load_key(base)
    nid = keys.checksum(keys.node_id_of(key))
    pub = keys.public_bytes(key).hex()
    out(args, {"node": nid, "pubkey": pub}, f"node ID {nid}\npublic key {pub}")


async def sign_and_register(args, base: Path, revoked: bool) -> None:
    key = load_key(base)
    st = state.read_json(base / state.STATE_FILE)
    if st.get("revoked"):
        raise CliError("this node ID is revoked; create a new one with `ntm keygen --force`")
    url = pick_dc(args, base, st)
    async with DcClient(url) as dc:
        info = await dc.info()
        if st.get("chain_id") and (st["chain_id"], st["registry"]) != (info.chain_id, info.registry):
            raise CliError(
                f"DC at {url} is on chain {info.chain_id} registry {info.registry}, but this node is "
                f"registered on chain {st['chain_id']} registry {st['registry']}"
            )
        ts = record.next_timestamp(int(time.time() * 1000), st.get("timestamp", 0))
        req = RegistrationRequest.signed(key, info, ts, args.addr or local_addrs_towards(urlsplit(url).hostname, TUNNEL_PORT),
                                         revoked)
        res = await dc.register(req, wait_confirmed=not args.no_wait)
    state.write_json(base / state.STATE_FILE, {
        "dc_url": url, "dc": info.dc, "hostname": info.hostname, "chain_id": info.chain_id,
        "registry": info.registry, "timestamp": ts, "revoked": revoked, "status": res.status,
        "block": res.block, "tx": res.tx,
    })
    what = "revoked" if revoked else "registered"
    where = f"block {res.block}" if res.block is not None else "chain confirmation pending"
    out(args, {**messages.encode(res), "dc_url": url, "hostname": info.hostname},
        f"{what} {res.node} at DC {info.hostname} ({info.dc}, {url})\n"
        f"status: {res.status} ({where})")


async def cmd_register(args, base: Path) -> None:
    await sign_and_register(args, base, revoked=False)


async def cmd_revoke(args, base: Path) -> None:
    if not args.yes:
        raise CliError("revocation is permanent for this node ID on every DC; repeat with --yes", 2)
    await sign_and_register(args, base, revoked=True)


async def cmd_status(args, base: Path) -> None:
    key = load_key(base)
    nid = keys.node_id_of(key)
    st = state.read_json(base / state.STATE_FILE)
    data = {"node": keys.checksum(nid), "registered": bool(st), **st}
    if not st:
        out(args, data, f"node ID {data['node']}\nnot registered (run `ntm register --dc HOST`)")
        return
    async with DcClient(st["dc_url"]) as dc:
        try:
            seen = await dc.whois(nid)
            data.update(dc_reachable=True, confirmed=seen.confirmed, online=seen.online,
                        revoked=seen.revoked, home_dc=seen.home_dc)
        except DcError as exc:
            data.update(dc_reachable=exc.code != "unreachable", dc_error=str(exc))
    lines = [f"node ID   {data['node']}",
             f"DC        {st['hostname']} {st['dc']} at {st['dc_url']}"
             + ("" if data.get("dc_reachable") else "  (unreachable)"),
             f"chain     id {st['chain_id']}, registry {st['registry']}"]
    if "home_dc" in data:
        state_word = "revoked" if data["revoked"] else ("confirmed on chain" if data["confirmed"] else "pending")
        lines.append(f"record    {state_word}, home DC {data['home_dc']}, online: {'yes' if data['online'] else 'no'}")
    elif "dc_error" in data:
        lines.append(f"record    unknown ({data['dc_error']})")
    agent = state.read_json(base / state.AGENT_FILE)
    if agent and time.time() - agent.get("updated", 0) < AGENT_STALE_S:
        data["agent"] = agent
        lines.append(f"agent     pid {agent['pid']}, tunnel socket {agent['local']}, public {agent['observed']}")
        for t in agent["tunnels"]:
            rtt = f"{t['rtt_ms']} ms" if t.get("rtt_ms") is not None else "-"
            lines.append(f"tunnel    {t['peer']} {t['route']} via {t['via']}, rtt {rtt}, "
                         f"{t.get('rx_bytes', 0)} B in / {t.get('tx_bytes', 0)} B out ({t['state']})")
    else:
        lines.append("agent     not running (`ntm listen` keeps the node online)")
    out(args, data, "\n".join(lines))


async def cmd_whois(args, base: Path) -> None:
    try:
        nid = keys.parse_node_id(args.node)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    url = pick_dc(args, base, state.read_json(base / state.STATE_FILE))
    async with DcClient(url) as dc:
        info = await dc.whois(nid)
    flags = "revoked" if info.revoked else ("online" if info.online else "offline")
    out(args, messages.encode(info), f"{info.node}: home DC {info.home_dc}, {flags}"
        + (f"\npublic key {info.pubkey}" if info.pubkey else ""))


async def start_agent(args, base: Path) -> Node:
    """The node agent at this node's registered DC (tunnel socket on --host/--port)."""
    key = load_key(base)
    st = state.read_json(base / state.STATE_FILE)
    if not st or st.get("revoked"):
        raise CliError("this node is not registered (run `ntm register --dc HOST` first)", 2)
    try:
        return await Node.start(key, st["dc_url"], host=args.host, port=args.port,
                                last_timestamp=st.get("timestamp", 0))
    except (asyncio.TimeoutError, OSError) as exc:
        raise CliError(f"could not start the node at {st['dc_url']}: {exc or type(exc).__name__}") from None


def describe(t: Tunnel) -> str:
    via = t.channel.via or "?"
    return f"route {t.kind} via {via} (path {t.channel.path_id.hex()})"


async def open_tunnel(args, base: Path) -> tuple[Node, Tunnel]:
    try:
        peer = keys.parse_node_id(args.node)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    node = await start_agent(args, base)
    try:
        tunnel = await node.connect(peer, force_relay=args.relay)
    except BaseException:
        await node.close()
        raise
    if not args.json:
        print(f"tunnel to {keys.checksum(peer)}: {describe(tunnel)}", flush=True)
    return node, tunnel


async def cmd_ping(args, base: Path) -> None:
    node, tunnel = await open_tunnel(args, base)
    rtts = []
    try:
        for i in range(args.count):
            if i:
                await asyncio.sleep(args.interval)
            try:
                rtt = await tunnel.channel.ping(timeout=2.0) * 1000
            except (asyncio.TimeoutError, NtmError):
                if not args.json:
                    print(f"seq={i} timeout", flush=True)
                continue
            rtts.append(rtt)
            if not args.json:
                print(f"seq={i} rtt={rtt:.2f} ms", flush=True)
    finally:
        await node.close()
    summary = {"peer": args.node, "route": tunnel.kind, "via": tunnel.channel.via, "sent": args.count,
               "received": len(rtts), "rtt_ms": [round(r, 3) for r in rtts]}
    if args.json:
        print(json.dumps(summary, indent=2))
    elif rtts:
        print(f"{len(rtts)}/{args.count} replies, rtt min/avg/max {min(rtts):.2f}/{sum(rtts) / len(rtts):.2f}/{max(rtts):.2f} ms")
    if not rtts:
        raise CliError("no ping replies over the tunnel")


async def cmd_send(args, base: Path) -> None:
    node, tunnel = await open_tunnel(args, base)
    try:
        await tunnel.channel.send(args.message.encode())
        reply = None
        if args.wait_reply > 0:
            try:
                reply = (await asyncio.wait_for(tunnel.channel.recv(), args.wait_reply)).decode(errors="replace")
            except asyncio.TimeoutError:
                pass
    finally:
        await node.close()
    out(args, {"peer": args.node, "route": tunnel.kind, "via": tunnel.channel.via, "sent": args.message, "reply": reply},
        f"sent {len(args.message.encode())} bytes" + (f"\nreply: {reply}" if reply is not None else ""))


async def cmd_connect(args, base: Path) -> None:
    """stdin → tunnel, tunnel → stdout, until stdin closes."""
    node, tunnel = await open_tunnel(args, base)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def pump_out():
        while True:
            sys.stdout.buffer.write(await tunnel.channel.recv())
            sys.stdout.buffer.flush()

    printer = asyncio.create_task(pump_out())
    try:
        while line := await reader.readline():
            await tunnel.channel.send(line)
        await asyncio.sleep(0.5)  # let the last replies arrive
    finally:
        printer.cancel()
        await node.close()


async def cmd_listen(args, base: Path) -> None:
    """Serve incoming tunnels until SIGINT/SIGTERM; print (and with --echo return) what arrives."""
    node = await start_agent(args, base)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    emit = (lambda ev: print(json.dumps(ev), flush=True)) if args.json else None
    say = emit or (lambda ev: print(ev["text"], flush=True))
    say({"event": "listening", "node": keys.checksum(node.id), "dc": node.dc_url, "observed": node.observed,
         "text": f"listening as {keys.checksum(node.id)} at {node.dc_url} (public address {node.observed})"})

    async def serve(t: Tunnel) -> None:
        peer = keys.checksum(t.peer)
        say({"event": "tunnel", "peer": peer, "route": t.kind, "text": f"tunnel from {peer}: {describe(t)}"})
        while True:
            try:
                data = await t.channel.recv()
            except TunnelError as exc:
                say({"event": "closed", "peer": peer, "text": f"tunnel from {peer} ended: {exc}"})
                return
            say({"event": "message", "peer": peer, "data": data.decode(errors="replace"),
                 "text": f"{peer}: {data.decode(errors='replace')}"})
            if args.echo:
                await t.channel.send(data)

    serving = BackgroundTasks()

    async def accept_loop() -> None:
        while True:
            serving.spawn(serve(await node.accept()))

    async def status_loop() -> None:
        while True:
            state.write_json(base / state.AGENT_FILE, {"pid": os.getpid(), "updated": time.time(), **node.status()})
            st = state.read_json(base / state.STATE_FILE)
            if node.home and st.get("timestamp", 0) < node.home["timestamp"]:  # the agent failed over
                state.write_json(base / state.STATE_FILE, {**st, **node.home})
            await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(accept_loop()), asyncio.create_task(status_loop())]
    await stop.wait()
    for t in tasks:
        t.cancel()
    (base / state.AGENT_FILE).unlink(missing_ok=True)
    await node.close()
    say({"event": "stopped", "text": "stopped"})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ntm", description="NTMobile node: identity, registration, tunnels.")
    p.add_argument("--home", type=Path, help="node directory (default $NTM_HOME or ~/.ntm)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("keygen", help="create this node's key (passphrase from $NTM_PASSPHRASE)")
    s.add_argument("--force", action="store_true", help="replace an existing key")
    s.set_defaults(func=cmd_keygen)
    sub.add_parser("id", help="print this node's ID and public key").set_defaults(func=cmd_id)
    for name, func, hlp in (("register", cmd_register, "register (or move) this node at a DC"),
                            ("revoke", cmd_revoke, "revoke this node ID network-wide (permanent)")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--dc", help="DC as HOST[:PORT] or URL (default: the current DC or the devnet's)")
        s.add_argument("--addr", action="append", help="local tunnel endpoint ip:port to announce (repeatable)")
        s.add_argument("--no-wait", action="store_true", help="return once durable at the DC, before the chain confirms")
        if name == "revoke":
            s.add_argument("--yes", action="store_true", help="confirm the permanent revocation")
        s.set_defaults(func=func)
    sub.add_parser("status", help="registration state as this node's DC sees it").set_defaults(func=cmd_status)
    def tunnel_cmd(name: str, func, hlp: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("node", help="peer node ID (0x…)")
        sp.add_argument("--relay", action="store_true", help="ask for the relay instead of a direct path")
        sp.add_argument("--host", help="local address for the tunnel socket (default: all, dual-stack)")
        sp.add_argument("--port", type=int, default=0, help="local tunnel UDP port (default: any)")
        sp.set_defaults(func=func)
        return sp

    s = tunnel_cmd("ping", cmd_ping, "measure round trips over a tunnel to a node")
    s.add_argument("-c", "--count", type=int, default=4, help="pings to send (default 4)")
    s.add_argument("-i", "--interval", type=float, default=0.2, help="seconds between pings (default 0.2)")
    s = tunnel_cmd("send", cmd_send, "send one message over a tunnel and print the reply")
    s.add_argument("message", help="text to send")
    s.add_argument("--wait-reply", type=float, default=2.0, help="seconds to wait for a reply (0: none)")
    tunnel_cmd("connect", cmd_connect, "pipe stdin/stdout through a tunnel to a node")
    s = sub.add_parser("listen", help="stay online and accept tunnels, printing what arrives")
    s.add_argument("--echo", action="store_true", help="send every message back")
    s.add_argument("--host", help="local address for the tunnel socket (default: all, dual-stack)")
    s.add_argument("--port", type=int, default=TUNNEL_PORT, help=f"tunnel UDP port (default {TUNNEL_PORT})")
    s.set_defaults(func=cmd_listen)
    s = sub.add_parser("whois", help="look a node up through the DC federation")
    s.add_argument("node", help="node ID (0x…)")
    s.add_argument("--dc", help="DC to ask (default: this node's DC)")
    s.set_defaults(func=cmd_whois)
    sub.add_parser("devnet", add_help=False,
                   help="run a local federation (anvil chain, 2 DCs, 1 relay) until Ctrl-C (--help: its flags)")
    return p


def exec_devnet(args, base: Path, devnet_args: list[str]) -> None:
    """`ntm devnet ...` is scripts/devnet.py, a separate program (the node's CLI does not import
    the developer scripts): replace this process with it, so signals and output are its own."""
    argv = ["--home", str(base), *(["--json"] if args.json else []), *devnet_args]
    code = "import sys; from scripts.devnet import main; sys.exit(main(sys.argv[1:], prog='ntm devnet'))"
    os.execv(sys.executable, [sys.executable, "-c", code, *argv])


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, rest = p.parse_known_args(argv)
    base = args.home or state.home()
    if args.command == "devnet":
        exec_devnet(args, base, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        asyncio.run(args.func(args, base))
    except CliError as exc:
        print(f"ntm: {exc}", file=sys.stderr)
        return exc.code
    except DcError as exc:
        hint = {"revoked": " (this node ID can never register again; `ntm keygen --force` makes a new one)"}
        print(f"ntm: {exc}{hint.get(exc.code, '')}", file=sys.stderr)
        return 1
    except (NtmError, ValueError) as exc:
        print(f"ntm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

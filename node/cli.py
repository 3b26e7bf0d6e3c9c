"""`ntm`: the node's command line. Human-readable output by default, `--json` for scripts.

Exit codes: 0 ok, 1 refused or failed (the message says why), 2 usage or local file problems,
3 no daemon running (`ntm up` starts it).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import sys
import time
from pathlib import Path

from urllib.parse import urlsplit

from node import control, cs_client, daemon, mailbox, state
from node.agent import KEEPALIVE_INTERVAL_S, local_addrs_towards
from node.dc_client import DcClient, DcError, dc_url
from node.peers import PeerBook, PeerBookError
from daemon import keystore
from daemon.service import setup_logging
from ntm import keys, messages, record, seal, vaddr
from ntm.errors import KeystoreError, NtmError
from ntm.registration import RegistrationRequest

TUNNEL_PORT = 4330  # the seeds' NTM port


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


def event(args, data: dict, text: str) -> None:
    """A line of a long-running command: with --json one JSON object per line."""
    print(json.dumps(data) if args.json else text, flush=True)


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
    if res.status == "rejected":  # the chain's verdict in a mined block: nothing to remember
        raise CliError(f"the chain refused the record of {res.node}: {res.reason or 'no reason given'}", 1)
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
    try:
        d = await control.call(base, "status", timeout=10)
    except control.ControlError as exc:
        lines.append(f"daemon    not running ({exc})" if exc.code != "no_daemon" else
                     "daemon    not running (`ntm up` keeps the node online)")
    else:
        data["daemon"] = d
        lines.append(f"daemon    pid {d['pid']}, up {d['uptime_s']:.0f} s, tunnel socket {d['local']}, "
                     f"public {d['observed']}")
        lines.append(f"overlay   {d['ipv6']}  {d['ipv4']}  " + (f"on {d['tun']}" if d["tun"] else "(no TUN)")
                     + (f", DNS {', '.join(d['dns'])}" if d["dns"] else ""))
        lines.append(peers_table(d["peers"]))
    out(args, data, "\n".join(lines))


def peers_table(rows: list[dict]) -> str:
    """The daemon's open tunnels, one peer per line (like `wg show`)."""
    if not rows:
        return "peers     none"
    head = ("PEER", "VIRTUAL", "ROUTE", "ENDPOINT", "HANDSHAKE", "RX", "TX", "RTT")
    table = [head]
    for r in rows:
        name = ",".join(r["names"]) or r["peer"][:12] + "…"
        table.append((name, f"{r['ipv6']} {r['ipv4']}", r["route"], r["endpoint"] or "-",
                      f"{r['last_handshake_s']:.0f} s ago" if r["last_handshake_s"] is not None else "-",
                      human_bytes(r["rx_bytes"]), human_bytes(r["tx_bytes"]),
                      f"{r['rtt_ms']:.2f} ms" if r["rtt_ms"] is not None else "-"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)



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


def need_registration(base: Path) -> dict:
    st = state.read_json(base / state.STATE_FILE)
    if not st or st.get("revoked"):
        raise CliError("this node is not registered (run `ntm register --dc HOST` first)", 2)
    return st


def up_options(args) -> daemon.UpOptions:
    return daemon.UpOptions(
        tun=None if args.no_tun else (args.tun or "ntm0"), require_tun=args.tun is not None,
        v4_net=args.v4_net, path_mtu=args.path_mtu, dns=args.dns, accept_any=args.accept_any,
        echo=args.echo, host=args.host, port=args.port, keepalive=args.keepalive)


async def cmd_up(args, base: Path) -> None:
    """Run the node daemon in the foreground until SIGINT/SIGTERM or `ntm down`."""
    setup_logging(args.verbose)
    key = load_key(base)
    st = need_registration(base)
    opts = up_options(args)
    try:
        vaddr.tun_mtu(opts.path_mtu)
    except vaddr.AddressError as exc:
        raise CliError(str(exc), 2) from None
    if not 0 < opts.keepalive <= 3600 or not 0 <= opts.port < 65536:
        raise CliError("--keepalive must be in (0, 3600] seconds and --port in 0..65535", 2)

    def ready(info: dict) -> None:
        where = f"TUN {info['tun']} (MTU {info['mtu']})" if info["tun"] else "no TUN (datagram mode)"
        event(args, {"event": "up", **info},
            f"up as {info['node']} at {info['dc']} (public address {info['observed']})\n"
            f"{where}, virtual addresses {info['ipv6']} and {info['ipv4']}"
            + (f", DNS on {', '.join(info['dns'])}" if info["dns"] else "") + f"\ncontrol socket {info['socket']}")

    try:
        await daemon.up(base, key, st, opts, ready)
    except (asyncio.TimeoutError, OSError) as exc:
        raise CliError(f"could not start the node at {st['dc_url']}: {exc or type(exc).__name__}") from None
    event(args, {"event": "down"}, "stopped")


async def cmd_down(args, base: Path) -> None:
    res = await control.call(base, "down")
    out(args, res, f"daemon (pid {res['pid']}) stopping")


async def ask(base: Path, name: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    """A request to the running daemon; without one, say how to start it."""
    try:
        return await control.call(base, name, body, timeout)
    except control.ControlError as exc:
        raise CliError(str(exc), 3 if exc.code == "no_daemon" else 1) from None


def peer_arg(base: Path, name: str) -> str:
    """Check a peer given as node ID or alias before sending it to the daemon."""
    try:
        return keys.checksum(PeerBook.load(base).resolve(name))
    except PeerBookError as exc:
        raise CliError(str(exc), 2) from None


async def cmd_ping(args, base: Path) -> None:
    if args.count < 1 or args.interval < 0:
        raise CliError("ping needs --count >= 1 and --interval >= 0", 2)
    peer = peer_arg(base, args.node)
    res = await ask(base, "ping", {"peer": peer, "count": args.count, "interval": args.interval,
                                   "relay": args.relay}, timeout=30 + args.count * (args.interval + 3))
    rtts = [r for r in res["rtt_ms"] if r is not None]
    lines = [f"tunnel to {res['peer']}: route {res['route']} via {res['via']}"]
    lines += [f"seq={i} " + (f"rtt={r:.2f} ms" if r is not None else "timeout") for i, r in enumerate(res["rtt_ms"])]
    if rtts:
        lines.append(f"{len(rtts)}/{args.count} replies, rtt min/avg/max "
                     f"{min(rtts):.2f}/{sum(rtts) / len(rtts):.2f}/{max(rtts):.2f} ms")
    out(args, {**res, "sent": args.count, "received": len(rtts)}, "\n".join(lines))
    if not rtts:
        raise CliError("no ping replies over the tunnel")


async def cmd_send(args, base: Path) -> None:
    if args.offline or args.file:
        await send_offline(args, base)
        return
    if args.message is None:
        raise CliError("nothing to send: give a MESSAGE (or --file PATH with --offline)", 2)
    if args.wait_reply < 0:
        raise CliError("--wait-reply must be >= 0", 2)
    peer = peer_arg(base, args.node)
    res = await ask(base, "send", {"peer": peer, "text": args.message, "wait_reply": args.wait_reply,
                                   "relay": args.relay}, timeout=30 + args.wait_reply)
    out(args, res, f"sent {res['sent']} bytes" + (f"\nreply: {res['reply']}" if res["reply"] is not None else ""))


async def send_offline(args, base: Path) -> None:
    """Seal MESSAGE or --file for the peers (comma-separated) and leave it at our DC's Cache Server."""
    peers = [keys.parse_node_id(peer_arg(base, p)) for p in args.node.split(",") if p]
    if args.file is not None:
        if args.message is not None:
            raise CliError("give a MESSAGE or --file, not both", 2)
        path = Path(args.file)
        if not path.is_file():
            raise CliError(f"{path} is not a readable file", 2)
        content_len, source, name = path.stat().st_size, cs_client.file_chunks(path), path.name
    elif args.message is not None:
        data = args.message.encode()
        content_len, source, name = len(data), cs_client.bytes_chunks(data), ""
    else:
        raise CliError("nothing to send: give a MESSAGE or --file PATH", 2)
    try:
        meta = seal.Meta(args.app, notice=args.notice if args.notice is not None else (args.message or name)[:140],
                         name=name)
        seal.check_meta(meta)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    key = load_key(base)
    st = need_registration(base)
    async with DcClient(st["dc_url"]) as dc:
        info = await dc.info()
        if not info.cs:
            raise CliError(f"DC {st['dc_url']} has no Cache Server (its operator starts one with ntm-cs and --cs)")
        recipients = {}
        for peer in peers:
            who = await dc.whois(peer)
            if who.revoked or not who.pubkey:
                raise CliError(f"{keys.checksum(peer)} is revoked: it can receive nothing")
            recipients[peer] = bytes.fromhex(who.pubkey)
    try:
        sealer = seal.Sealer(key, recipients, meta, int(time.time() * 1000))
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    async with cs_client.CsClient(key, info.cs) as cs:
        res = await cs.put(sealer, source, content_len)
    out(args, {**res, "cs": info.cs, "recipients": [keys.checksum(p) for p in peers]},
        f"stored item {res['item']} ({res['size']} bytes, sealed) at {info.cs} for {len(peers)} recipient(s); "
        "each gets it when next online")


async def cmd_inbox(args, base: Path) -> None:
    """Items waiting for us at the federation's Cache Servers, and those already fetched here."""
    key = load_key(base)
    st = need_registration(base)
    waiting = []
    for url in await mailbox.federation_cs_urls(st["dc_url"]):
        async with cs_client.CsClient(key, url) as cs:
            waiting += [{"cs": url, **{k: e[k] for k in ("item", "sender", "size", "created", "expires")}}
                        for e in await cs.inbox()]
    local = [json.loads(p.read_text()) for p in sorted((base / daemon.INBOX_DIR).glob("*.json"))]
    lines = [f"waiting: {w['item']} from {w['sender']}, {w['size']} bytes, at {w['cs']}" for w in waiting]
    lines += [f"received: {r['item']} from {r['sender']}, {r['app_id']}: {r['notice'] or r['name']} -> {r['path']}"
              for r in local]
    out(args, {"waiting": waiting, "received": local}, "\n".join(lines) or "(nothing)")


async def cmd_fetch(args, base: Path) -> None:
    """Download, open and confirm waiting items (all, or the ones named)."""
    key = load_key(base)
    st = need_registration(base)
    out_dir = Path(args.out) if args.out else base / daemon.INBOX_DIR
    got, failed = [], []
    for url in await mailbox.federation_cs_urls(st["dc_url"]):
        async with cs_client.CsClient(key, url) as cs:
            for entry in await cs.inbox():
                if args.items and entry["item"] not in args.items:
                    continue
                try:
                    got.append((await cs.fetch(entry["item"], out_dir)).describe())
                except cs_client.CsClientError as exc:
                    failed.append({"item": entry["item"], "error": exc.code, "message": str(exc)})
    lines = [f"{g['item']} from {g['sender']} ({g['app_id']}): {g['notice'] or g['name']} -> {g['path']}" for g in got]
    lines += [f"{f['item']}: refused: {f['message']}" for f in failed]
    out(args, {"fetched": got, "failed": failed}, "\n".join(lines) or "(nothing waiting)")
    if failed:
        raise CliError(f"{len(failed)} item(s) could not be opened; they stay at their Cache Server until they expire")


async def cmd_recv(args, base: Path) -> None:
    if args.wait < 0:
        raise CliError("--wait must be >= 0", 2)
    res = await ask(base, "recv", {"wait": args.wait}, timeout=30 + args.wait)
    out(args, res, "\n".join(f"{m['peer']}: {m['text']}" for m in res["messages"]) or "(nothing)")


async def cmd_group(args, base: Path) -> None:
    """`ntm group ...`: through the daemon, which holds the group keys and receives group traffic."""
    body: dict = {k: v for k, v in (("group", getattr(args, "group", None)), ("name", getattr(args, "name", None)),
                                    ("text", getattr(args, "text", None))) if v is not None}
    if getattr(args, "node", None) is not None:
        body["node"] = peer_arg(base, args.node)
    if args.group_cmd == "send" and len(args.text.encode()) > 1024:
        raise CliError("a group message is at most 1024 bytes (send larger content with `ntm send --offline`)", 2)
    if args.group_cmd == "recv":
        if args.wait < 0:
            raise CliError("--wait must be >= 0", 2)
        body["wait"] = args.wait
    res = await ask(base, f"group.{args.group_cmd}", body, timeout=60 + body.get("wait", 0))
    out(args, res, group_text(args.group_cmd, res))


def group_text(cmd: str, r: dict) -> str:
    def line(g: dict) -> str:
        key = "key ready" if g["has_key"] else "waiting for the admin's RN1"
        return (f"{g['name']}  {g['gid']}  {g['status']}, epoch {g['epoch']}, {len(g['members'])} members, {key}"
                f"{' (you are its admin)' if g['admin'] == g['you'] else ''}")

    if cmd == "recv":
        return "\n".join(f"[{m['group']}] {m['sender']}: {m['text']}" for m in r["messages"]) or "(nothing)"
    if cmd == "members" and "groups" in r:
        return "\n".join(line(g) for g in r["groups"]) or "(no groups)"
    if cmd == "send":
        return (f"sent to {r['name']} (epoch {r['epoch']}): {len(r['tunnel'])} over tunnels, {len(r['cs'])} left at "
                f"a Cache Server, {len(r['failed'])} failed" + (f"\nwarning: {r['gms_unreachable']}" if "gms_unreachable" in r else ""))
    text = line(r)
    if cmd == "invite":
        text += f"\ninvited {r['invited']} (invitation {'sent over a tunnel' if r['via'] == 'tunnel' else 'left at a Cache Server' if r['via'] == 'cs' else 'not delivered'})"
    if cmd == "members":
        text += "\n" + "\n".join(f"  {m}{'  (admin)' if m == r['admin'] else ''}{'  (you)' if m == r['you'] else ''}"
                                  for m in r["members"])
    return text


async def edit_peers(args, base: Path, change) -> PeerBook:
    """Apply `change` to peers.json and tell a running daemon to re-read it."""
    try:
        book = PeerBook.load(base)
        change(book)
    except PeerBookError as exc:
        raise CliError(str(exc), 2) from None
    book.save(base)
    try:
        await control.call(base, "reload")
    except control.ControlError:
        pass  # no daemon: it reads the file when it starts
    return book


async def cmd_alias(args, base: Path) -> None:
    if args.name is None:
        book = PeerBook.load(base)
        out(args, {"aliases": {n: keys.checksum(i) for n, i in book.aliases.items()}},
            "\n".join(f"{n}.ntm  {keys.checksum(i)}" for n, i in sorted(book.aliases.items())) or "(no aliases)")
        return
    if args.node is None:
        await edit_peers(args, base, lambda b: b.aliases.pop(args.name.lower(), None))
        out(args, {"removed": args.name}, f"alias {args.name} removed")
        return
    try:
        nid = keys.parse_node_id(args.node)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    await edit_peers(args, base, lambda b: b.set_alias(args.name, nid))
    out(args, {"alias": args.name.lower(), "node": keys.checksum(nid)},
        f"{args.name.lower()}.ntm is {keys.checksum(nid)}")


async def cmd_allow(args, base: Path) -> None:
    if args.node is None:
        book = PeerBook.load(base)
        out(args, {"allow": sorted(keys.checksum(i) for i in book.allow)},
            "\n".join(keys.checksum(i) for i in sorted(book.allow)) or "(nobody: only outbound tunnels)")
        return
    book = PeerBook.load(base)
    try:
        nid = book.resolve(args.node)
    except PeerBookError as exc:
        raise CliError(str(exc), 2) from None
    if args.remove:
        await edit_peers(args, base, lambda b: b.allow.discard(nid))
        out(args, {"removed": keys.checksum(nid)}, f"{keys.checksum(nid)} may no longer open tunnels to this node")
    else:
        await edit_peers(args, base, lambda b: b.allow.add(nid))
        out(args, {"allowed": keys.checksum(nid)}, f"{keys.checksum(nid)} may open tunnels to this node")


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
    sub.add_parser("status", help="registration state, and the daemon's peers if it runs").set_defaults(func=cmd_status)
    s = sub.add_parser("up", help="run the node daemon (DC session, tunnels, TUN, DNS) until Ctrl-C or `ntm down`")
    s.add_argument("--tun", metavar="NAME", help="TUN interface name (default ntm0; given: fail if no TUN)")
    s.add_argument("--no-tun", action="store_true", help="no TUN interface: datagram mode (no root needed)")
    s.add_argument("--v4-net", type=ipaddress.IPv4Network, default=vaddr.V4_NET, metavar="CIDR",
                   help=f"virtual IPv4 network; this node is its first address (default {vaddr.V4_NET})")
    s.add_argument("--path-mtu", type=int, default=vaddr.PATH_MTU, metavar="BYTES",
                   help=f"outer path MTU; the TUN MTU is this minus the tunnel overhead (default {vaddr.PATH_MTU})")
    s.add_argument("--dns", type=daemon.dns_bind, action="append", metavar="IP:PORT",
                   help="where to answer DNS for .ntm names (repeatable; default: the TUN addresses, port 53)")
    s.add_argument("--accept-any", action="store_true", help="accept tunnels from any node (demos; default: `ntm allow` list)")
    s.add_argument("--echo", action="store_true", help="send every application datagram back (tests, demos)")
    s.add_argument("--host", help="local address for the tunnel socket (default: all, dual-stack)")
    s.add_argument("--port", type=int, default=TUNNEL_PORT, help=f"tunnel UDP port (default {TUNNEL_PORT})")
    s.add_argument("--keepalive", type=float, default=KEEPALIVE_INTERVAL_S, metavar="S",
                   help=f"keepalive period; below the shortest NAT UDP timeout on the way (default {KEEPALIVE_INTERVAL_S:.0f})")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    s.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the running daemon").set_defaults(func=cmd_down)

    def peer_cmd(name: str, func, hlp: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("node", help="peer node ID (0x…) or alias")
        sp.add_argument("--relay", action="store_true", help="ask for the relay instead of a direct path")
        sp.set_defaults(func=func)
        return sp

    s = peer_cmd("ping", cmd_ping, "measure round trips over a tunnel to a node (through the daemon)")
    s.add_argument("-c", "--count", type=int, default=4, help="pings to send (default 4)")
    s.add_argument("-i", "--interval", type=float, default=0.2, help="seconds between pings (default 0.2)")
    s = peer_cmd("send", cmd_send, "send one datagram over a tunnel and print the reply (through the daemon); "
                 "--offline: leave it, sealed, at a Cache Server for peers that are offline")
    s.add_argument("message", nargs="?", help="text to send")
    s.add_argument("--wait-reply", type=float, default=2.0, help="seconds to wait for a reply (0: none)")
    s.add_argument("--offline", action="store_true",
                   help="store-and-forward: seal for NODE (comma-separated: several) and upload to our DC's Cache Server")
    s.add_argument("--file", metavar="PATH", help="with --offline: send this file instead of MESSAGE")
    s.add_argument("--app", default="ntm", help="with --offline: the application ID the item is for (default ntm)")
    s.add_argument("--notice", help="with --offline: the notification text (default: the message or file name)")
    s = sub.add_parser("inbox", help="items waiting for this node at the federation's Cache Servers, and those fetched")
    s.set_defaults(func=cmd_inbox)
    s = sub.add_parser("fetch", help="download, open and confirm waiting Cache Server items")
    s.add_argument("items", nargs="*", metavar="ITEM", help="item IDs (default: all waiting)")
    s.add_argument("--out", metavar="DIR", help="where to write them (default $NTM_HOME/inbox)")
    s.set_defaults(func=cmd_fetch)
    s = sub.add_parser("recv", help="datagrams peers sent to this node (through the daemon)")
    s.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the first one")
    s.set_defaults(func=cmd_recv)
    s = sub.add_parser("alias", help="name a node: NAME.ntm in DNS and NAME in commands (no NODE: remove; no args: list)")
    s.add_argument("name", nargs="?", help="alias (one DNS label)")
    s.add_argument("node", nargs="?", help="node ID (0x…)")
    s.set_defaults(func=cmd_alias)
    s = sub.add_parser("allow", help="let a node open tunnels to this one (no args: list)")
    s.add_argument("node", nargs="?", help="node ID (0x…) or alias")
    s.add_argument("--remove", action="store_true", help="take the node off the list")
    s.set_defaults(func=cmd_allow)
    s = sub.add_parser("whois", help="look a node up through the DC federation")
    s.add_argument("node", help="node ID (0x…)")
    s.add_argument("--dc", help="DC to ask (default: this node's DC)")
    s.set_defaults(func=cmd_whois)
    s = sub.add_parser("group", help="group messaging with keys no server knows (through the daemon)")
    gsub = s.add_subparsers(dest="group_cmd", required=True, metavar="{create,invite,accept,leave,remove,members,send,recv}")
    s.set_defaults(func=cmd_group)

    def group_cmd(name: str, hlp: str, *positional: tuple[str, str]) -> argparse.ArgumentParser:
        gp = gsub.add_parser(name, help=hlp)
        for arg, arg_help in positional:
            gp.add_argument(arg, help=arg_help)
        gp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        return gp

    GROUP = ("group", "group ID or name")
    group_cmd("create", "create a group; you are its admin", ("name", "group name (letters, digits, . _ -)"))
    group_cmd("invite", "invite a node (admin)", GROUP, ("node", "node ID (0x…) or alias"))
    group_cmd("accept", "accept an invitation", GROUP)
    group_cmd("leave", "leave a group", GROUP)
    group_cmd("remove", "remove a member or withdraw an invitation (admin); the others get new keys", GROUP,
              ("node", "node ID (0x…) or alias"))
    gp = group_cmd("members", "a group's members and epoch (no GROUP: every group here)")
    gp.add_argument("group", nargs="?", help="group ID or name")
    group_cmd("send", "send a message to every member", GROUP, ("text", "the message (at most 1024 bytes)"))
    gp = group_cmd("recv", "group messages received since the last recv")
    gp.add_argument("group", nargs="?", help="group ID or name (default: all)")
    gp.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the first one")
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
    except KeyboardInterrupt:  # Ctrl-C before the command had its own handler
        print("ntm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

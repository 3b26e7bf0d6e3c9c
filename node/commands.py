"""What each `ntm` command does (node/cli.py parses the line and reports errors; node/output.py
has the exit codes). Imported only when a command runs: this is where the heavy imports are.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from daemon import keystore, service, tlspin
from node import control, cs_client, daemon, mailbox, netcheck, state, status_view, stream_cli
from node.agent import local_addrs_towards
from node.dc_client import DcClient, DcError, dc_url
from node.daemon_streams import parse_local_target
from node.dc_session import DcSilent
from node.output import FAILED, NO_DAEMON, UNREACHABLE, USAGE, CliError, event, out, show_id
from node.peers import PeerBook, PeerBookError
from ntm import consent, keys, messages, record, routes, seal, tls_binding, vaddr
from ntm.clock import SYSTEM
from ntm.errors import KeystoreError, NtmError, SignatureError
from ntm.packet import MAX_PAYLOAD
from ntm.registration import RegistrationRequest

MAX_SEND_BYTES = MAX_PAYLOAD - 1  # `ntm send`: one tunnel datagram's payload less its application frame byte


def run(args, base: Path) -> int:
    """Run the command `args.cmd`; every failure becomes a CliError with its exit code."""
    service.setup_logging(args.verbose, args.log_level or ("info" if args.cmd == "up" else "warning"))
    try:
        asyncio.run(globals()[f"cmd_{args.cmd}"](args, base))
    except (CliError, KeyboardInterrupt):
        raise
    except DcError as exc:
        hint = {"revoked": " (this node ID can never register again; `ntm keygen --force` makes a new one)"}
        raise CliError(
            f"{exc}{hint.get(exc.code, '')}", UNREACHABLE if exc.code == "unreachable" else FAILED, exc.code
        ) from None
    except control.ControlError as exc:
        raise CliError(str(exc), NO_DAEMON if exc.code == "no_daemon" else FAILED, exc.code) from None
    except KeystoreError as exc:
        raise CliError(str(exc), USAGE, "key") from None
    except state.BadFile as exc:
        raise CliError(str(exc), USAGE, "local") from None
    except (NtmError, ValueError) as exc:
        raise CliError(str(exc), FAILED, getattr(exc, "code", "failed")) from None
    except OSError as exc:  # local files: --home a file or unwritable, a full disk
        where = f" ({exc.filename})" if exc.filename else ""
        raise CliError(f"{exc.strerror or exc}{where}", USAGE, "local") from None
    return 0


def passphrase(args, confirm: bool = False) -> str:
    """--password-file, else $NTM_PASSPHRASE, else a prompt on a terminal, else empty."""
    if args.password_file is not None:
        return keystore.passphrase(state.PASSPHRASE_ENV, args.password_file)
    if state.PASSPHRASE_ENV in os.environ:
        return os.environ[state.PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        return ""
    first = getpass.getpass("passphrase for the node key: ")
    if confirm and getpass.getpass("again: ") != first:
        raise CliError("the passphrases differ", USAGE)
    return first


def identity(key) -> dict:
    return {"node": keys.checksum(keys.node_id_of(key)), "pubkey": keys.public_bytes(key).hex()}


def write_id(base: Path, key) -> None:
    """id.json: the node's public identity, for `ntm id` without the passphrase."""
    state.write_json(base / state.ID_FILE, identity(key))


def load_key(args, base: Path):
    """The node key (passphrase as `passphrase` finds it); id.json made to match it."""
    key = keystore.load_keystore(base / state.KEY_FILE, passphrase(args))
    try:
        cached = state.read_json(base / state.ID_FILE)
    except state.BadFile:
        cached = None  # a cache: rebuilt below
    if cached != identity(key):
        write_id(base, key)
    return key


def node_arg(text: str) -> bytes:
    """A node ID typed by a user: hex, and if mixed-case, a valid EIP-55 checksum (a typo caught)."""
    try:
        nid = keys.parse_node_id(text)
    except ValueError as exc:
        raise CliError(str(exc), USAGE) from None
    body = keys.checksum(nid)[2:]  # what parse_node_id read, in EIP-55 case
    typed = text[-len(body) :]
    if typed != typed.lower() and typed != typed.upper() and typed != body:
        raise CliError(f"node ID {text!r} has a wrong EIP-55 checksum (a typo?); all lower-case skips the check", USAGE)
    return nid


def pick_dc(args, base: Path, st: dict) -> str:
    spec = args.dc or st.get("dc_url") or state.default_dc(base)
    if not spec:
        raise CliError("no DC given: use --dc HOST[:PORT] (or start `ntm devnet` to get a default)", USAGE)
    try:
        return dc_url(spec)
    except ValueError as exc:
        raise CliError(str(exc), USAGE) from None


def dc_pin(args, base: Path, st: dict, url: str) -> bytes | None:
    """The chain address the DC at `url` must prove (§5): --dc-address, else ours if it is our DC,
    else the one `ntm devnet` wrote for it. Plain http:// only with --insecure-plain-http."""
    if url.startswith("http://"):
        if not getattr(args, "insecure_plain_http", False):
            raise CliError(
                f"{url} is plain HTTP: anyone on the path could read and rewrite it; use https:// "
                f"(the default) or, for development only, {tlspin.INSECURE_FLAG}",
                USAGE,
            )
        tlspin.warn_plain(f"the DC at {url}")
    if getattr(args, "dc_address", None):
        return node_arg(args.dc_address)
    if st.get("dc") and st.get("dc_url") == url:
        return keys.parse_node_id(st["dc"])
    known = state.devnet_dc_address(base, url)
    return keys.parse_node_id(known) if known else None


async def unknown_dc(url: str, timeout: float) -> CliError:
    """Why we cannot use a DC we have no chain address for, naming the address it claims (its
    binding's signer): a node cannot read the chain itself, so the user confirms it."""
    try:
        async with aiohttp.ClientSession() as http:
            der, info = await tlspin.presented(http, url, timeout)
        claim = keys.checksum(tls_binding.signer(info.tls, der)) if info.tls else None
    except tlspin.ChannelError as exc:
        if exc.code == "unreachable":
            raise DcError("unreachable", f"cannot reach DC at {url}: {exc}") from None
        claim = None
    except SignatureError:
        claim = None
    said = f"it says it is DC {claim}" if claim else "it proves no chain key"
    return CliError(
        f"the DC at {url} is not known to this node ({said}); check its address with its operator "
        f"(or on the chain's DC list) and repeat with --dc-address ADDRESS",
        USAGE,
    )


async def cmd_keygen(args, base: Path) -> None:
    path = base / state.KEY_FILE
    if path.exists() and not args.force:
        raise CliError(f"{path} exists; use --force to replace it (the old node ID is lost)", USAGE)
    key = keys.generate()
    keystore.save_keystore(key, path, passphrase(args, confirm=True))
    write_id(base, key)
    nid = keys.checksum(keys.node_id_of(key))
    out(args, {"node": nid, "key_file": str(path)}, f"new node key in {path}\nnode ID {nid}")


async def cmd_id(args, base: Path) -> None:
    """Without a usable id.json (node/cli.py answers from it otherwise): open the key (which
    writes id.json) and show it."""
    show_id(args, identity(load_key(args, base)))


async def sign_and_register(args, base: Path, revoked: bool) -> None:
    """The DC is checked before the key is opened: a bad --dc is told without a passphrase prompt
    (a missing key file first: that needs no passphrase either)."""
    keystore.read_blob(base / state.KEY_FILE)
    st = state.read_state(base)
    if st.get("revoked"):
        raise CliError("this node ID is revoked; create a new one with `ntm keygen --force`")
    url = pick_dc(args, base, st)
    pin = dc_pin(args, base, st, url)
    if pin is None and url.startswith("https://"):
        raise await unknown_dc(url, args.timeout)
    key = load_key(args, base)
    async with DcClient(url, args.timeout, pin=pin) as dc:
        info = await dc.info()
        if st.get("chain_id") and (st["chain_id"], st["registry"]) != (info.chain_id, info.registry):
            raise CliError(
                f"DC at {url} is on chain {info.chain_id} registry {info.registry}, but this node is "
                f"registered on chain {st['chain_id']} registry {st['registry']}"
            )
        ts = record.next_timestamp(SYSTEM.wall_ms(), st.get("timestamp", 0))
        req = RegistrationRequest.signed(
            key, info, ts, args.addr or local_addrs_towards(urlsplit(url).hostname, state.TUNNEL_PORT), revoked
        )
        res = await dc.register(req, wait_confirmed=not args.no_wait)
    if res.status == "rejected":  # the chain's verdict in a mined block: nothing to remember
        raise CliError(f"the chain refused the record of {res.node}: {res.reason or 'no reason given'}", 1)
    state.write_json(
        base / state.STATE_FILE,
        {
            "dc_url": url,
            "dc": info.dc,
            "hostname": info.hostname,
            "chain_id": info.chain_id,
            "registry": info.registry,
            "timestamp": ts,
            "revoked": revoked,
            "status": res.status,
            "block": res.block,
            "tx": res.tx,
        },
    )
    what = "revoked" if revoked else "registered"
    where = f"block {res.block}" if res.block is not None else "chain confirmation pending"
    out(
        args,
        {**messages.encode(res), "dc_url": url, "hostname": info.hostname},
        f"{what} {res.node} at DC {info.hostname} ({info.dc}, {url})\nstatus: {res.status} ({where})",
    )


async def cmd_register(args, base: Path) -> None:
    await sign_and_register(args, base, revoked=False)


async def cmd_revoke(args, base: Path) -> None:
    if not args.yes:
        raise CliError("revocation is permanent for this node ID on every DC; repeat with --yes", USAGE)
    await sign_and_register(args, base, revoked=True)


async def cmd_status(args, base: Path) -> None:
    """Without a daemon answering (node/status_view.py answers from it otherwise): open the key
    and ask the DC."""
    key = load_key(args, base)
    nid = keys.node_id_of(key)
    st = state.read_state(base)
    data = {"node": keys.checksum(nid), "registered": bool(st), **st}
    if not st:
        out(args, data, f"node ID {data['node']}\nnot registered (run `ntm register --dc HOST`)")
        return
    async with DcClient(st["dc_url"], args.timeout, pin=keys.parse_node_id(st["dc"])) as dc:
        try:
            data.update(status_view.record_fields(messages.encode(await dc.whois(nid))))
        except DcError as exc:
            data.update(status_view.record_fields({"dc_error": str(exc), "unreachable": exc.code == "unreachable"}))
    d, why = None, None
    try:
        d = data["daemon"] = await control.call(base, "status", timeout=10)
    except control.ControlError as exc:
        why = (exc.code, str(exc))
    out(args, data, status_view.status_text(data, st, d, why))


async def cmd_whois(args, base: Path) -> None:
    nid = node_arg(args.node)
    st = state.read_state(base)
    url = pick_dc(args, base, st)
    pin = dc_pin(args, base, st, url)
    if pin is None and url.startswith("https://"):
        raise await unknown_dc(url, args.timeout)
    async with DcClient(url, args.timeout, pin=pin) as dc:
        info = await dc.whois(nid)
    flags = "revoked" if info.revoked else ("online" if info.online else "offline")
    out(
        args,
        messages.encode(info),
        f"{info.node}: home DC {info.home_dc}, {flags}" + (f"\npublic key {info.pubkey}" if info.pubkey else ""),
    )


def need_registration(base: Path) -> dict:
    st = state.read_state(base)
    if not st or st.get("revoked"):
        raise CliError("this node is not registered (run `ntm register --dc HOST` first)", USAGE)
    return st


def up_options(args) -> daemon.UpOptions:
    return daemon.UpOptions(
        tun=None if args.no_tun else (args.tun or "ntm0"),
        require_tun=args.tun is not None,
        v4_net=args.v4_net,
        path_mtu=args.path_mtu,
        dns=args.dns,
        accept_any=args.accept_any,
        echo=args.echo,
        host=args.host,
        port=args.port,
        keepalive=args.keepalive,
        offload=args.offload,
        advertise_routes=advertised(args.advertise_routes),
        advertise_exit=args.advertise_exit,
        use_routes=args.use_routes,
        exit_node=args.exit_node,
        exit_relay=args.exit_relay,
    )


def advertised(text: str) -> list:
    """--advertise-routes, checked before anything starts."""
    try:
        return routes.parse_prefixes(text)
    except routes.RouteError as exc:
        raise CliError(str(exc), USAGE) from None


async def cmd_up(args, base: Path) -> None:
    """Run the node daemon in the foreground until SIGINT/SIGTERM or `ntm down`."""
    opts = up_options(args)  # the flags first: a typo is told before the passphrase is asked for
    try:
        vaddr.tun_mtu(opts.path_mtu)
    except vaddr.AddressError as exc:
        raise CliError(str(exc), USAGE) from None
    if opts.exit_node and opts.exit_relay:
        raise CliError("--exit-node and --exit-relay both choose the exit: give one", USAGE)
    if not 0 < opts.keepalive <= 3600 or not 0 <= opts.port < 65536:
        raise CliError("--keepalive must be in (0, 3600] seconds and --port in 0..65535", USAGE)
    daemon.log_to_file(base)
    key = load_key(args, base)
    st = need_registration(base)

    def ready(info: dict) -> None:
        where = f"TUN {info['tun']} (MTU {info['mtu']})" if info["tun"] else "no TUN (datagram mode)"
        event(
            args,
            {"event": "up", **info},
            f"up as {info['node']} at {info['dc']} (public address {info['observed']})\n"
            f"{where}, virtual addresses {info['ipv6']} and {info['ipv4']}"
            + (f", DNS on {', '.join(info['dns'])}" if info["dns"] else "")
            + f"\ncontrol socket {info['socket']}",
        )
        service.sd_notify("READY=1")  # under systemd (packaging/systemd/ntm.service, Type=notify)

    try:
        await daemon.up(base, key, st, opts, ready)
    except (asyncio.TimeoutError, DcSilent):
        raise CliError(
            f"the DC at {st['dc_url']} did not open a session in time (is it up and answering?)", UNREACHABLE
        ) from None
    except OSError as exc:
        raise CliError(f"could not start the node at {st['dc_url']}: {exc.strerror or exc}", USAGE) from None
    event(args, {"event": "down"}, "stopped")


async def cmd_netcheck(args, base: Path) -> None:
    res = await ask(base, "netcheck", timeout=netcheck.PROBE_TIMEOUT_S * 3)
    out(args, res, netcheck.text(res))


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
    if name[:2] in ("0x", "0X"):
        return keys.checksum(node_arg(name))
    try:
        return keys.checksum(PeerBook.load(base).resolve(name))
    except PeerBookError as exc:
        raise CliError(str(exc), USAGE) from None


async def cmd_ping(args, base: Path) -> None:
    """One round trip per request to the daemon, printed as it comes; Ctrl-C prints the summary."""
    if args.count < 1 or args.interval < 0:
        raise CliError("ping needs --count >= 1 and --interval >= 0", USAGE)
    peer = peer_arg(base, args.node)
    rtts: list[float | None] = []
    res: dict = {}

    def summary() -> None:
        got = [r for r in rtts if r is not None]
        line = f"{len(got)}/{len(rtts)} replies" + (
            f", rtt min/avg/max {min(got):.2f}/{sum(got) / len(got):.2f}/{max(got):.2f} ms" if got else ""
        )
        out(args, {**res, "rtt_ms": rtts, "sent": len(rtts), "received": len(got)}, line)

    try:
        for i in range(args.count):
            if i:
                await asyncio.sleep(args.interval)
            # the first request opens the tunnel (relayed if asked); the others use it
            res = await ask(
                base,
                "ping",
                {"peer": peer, "count": 1, "interval": 0, "relay": args.relay and i == 0},
                timeout=30 if i == 0 else 10,
            )
            rtts.append(res["rtt_ms"][0])
            if not args.json:
                if i == 0:
                    print(f"tunnel to {res['peer']}: route {res['route']} via {res['via']}")
                print(f"seq={i} " + (f"rtt={rtts[-1]:.2f} ms" if rtts[-1] is not None else "timeout"), flush=True)
    except asyncio.CancelledError:  # Ctrl-C: what we have so far, then exit 130
        summary()
        raise
    summary()
    if not any(r is not None for r in rtts):
        raise CliError("no ping replies over the tunnel")


async def cmd_send(args, base: Path) -> None:
    if args.offline or args.file:
        await send_offline(args, base)
        return
    if args.message is None:
        raise CliError("nothing to send: give a MESSAGE (or --file PATH with --offline)", USAGE)
    if args.wait_reply < 0:
        raise CliError("--wait-reply must be >= 0", USAGE)
    size = len(args.message.encode())
    if size > MAX_SEND_BYTES:
        raise CliError(
            f"the message is {size} bytes; one datagram carries at most {MAX_SEND_BYTES} "
            "(`ntm send NODE --offline --file PATH` takes any size)",
            USAGE,
        )
    peer = peer_arg(base, args.node)
    res = await ask(
        base,
        "send",
        {"peer": peer, "text": args.message, "wait_reply": args.wait_reply, "relay": args.relay},
        timeout=30 + args.wait_reply,
    )
    out(args, res, f"sent {res['sent']} bytes" + (f"\nreply: {res['reply']}" if res["reply"] is not None else ""))


async def send_offline(args, base: Path) -> None:
    """Seal MESSAGE or --file for the peers (comma-separated) and leave it at our DC's Cache Server."""
    peers = [keys.parse_node_id(peer_arg(base, p)) for p in args.node.split(",") if p]
    if args.file is not None:
        if args.message is not None:
            raise CliError("give a MESSAGE or --file, not both", USAGE)
        path = Path(args.file)
        if not path.is_file():
            raise CliError(f"{path} is not a readable file", USAGE)
        content_len, source, name = path.stat().st_size, cs_client.file_chunks(path), path.name
    elif args.message is not None:
        data = args.message.encode()
        content_len, source, name = len(data), cs_client.bytes_chunks(data), ""
    else:
        raise CliError("nothing to send: give a MESSAGE or --file PATH", USAGE)
    try:  # bad input is refused before the key is opened
        meta = seal.Meta(
            args.app, notice=args.notice if args.notice is not None else (args.message or name)[:140], name=name
        )
        seal.check_meta(meta)
    except ValueError as exc:
        raise CliError(str(exc), USAGE) from None
    key = load_key(args, base)
    st = need_registration(base)
    try:
        res = await cs_client.leave_sealed(
            key,
            st["dc_url"],
            peers,
            meta,
            source,
            content_len,
            SYSTEM.wall_ms(),
            args.timeout,
            keys.parse_node_id(st["dc"]),
        )
    except ValueError as exc:
        raise CliError(str(exc), USAGE) from None
    out(
        args,
        {**res, "recipients": [keys.checksum(p) for p in peers]},
        f"stored item {res['item']} ({res['size']} bytes, sealed) at {res['cs']} for {len(peers)} recipient(s); "
        "each gets it when next online",
    )


async def cmd_inbox(args, base: Path) -> None:
    """Items waiting for us at the federation's Cache Servers, and those already fetched here;
    `ntm inbox fetch ITEM...` fetches waiting ones (a stranger's wait until then, §12.1)."""
    if args.action == "fetch":
        return await inbox_fetch(args, base)
    key = load_key(args, base)
    st = need_registration(base)
    waiting = []
    for url in await mailbox.federation_cs_urls(st["dc_url"], args.timeout, keys.parse_node_id(st["dc"])):
        async with cs_client.CsClient(key, url) as cs:
            waiting += [
                {"cs": url, **{k: e[k] for k in ("item", "sender", "size", "created", "expires")}}
                for e in await cs.inbox()
            ]
    local = [json.loads(p.read_text()) for p in sorted((base / daemon.INBOX_DIR).glob("*.json"))]
    esc = consent.escape
    lines = [
        f"waiting: {esc(w['item'])} from {esc(w['sender'])}, {w['size']} bytes, at {esc(w['cs'])}" for w in waiting
    ]
    lines += [
        f"received: {r['item']} from {r['sender']}, {esc(r['app_id'])}: {esc(r['notice'] or r['name'])} -> {r['path']}"
        for r in local
    ]
    out(args, {"waiting": waiting, "received": local}, "\n".join(lines) or "(nothing)")


async def inbox_fetch(args, base: Path) -> None:
    """Through the running daemon (which hands group traffic to its groups); without one, directly."""
    if not args.items:
        raise CliError("name the items to fetch: ntm inbox fetch ITEM... (`ntm inbox` lists them)", USAGE)
    try:
        res = await control.call(base, "inbox.fetch", {"items": args.items}, timeout=60 + 30 * len(args.items))
    except control.ControlError as exc:
        if exc.code != "no_daemon":
            raise CliError(str(exc), FAILED) from None
        args.out = None
        return await cmd_fetch(args, base)
    got = [f for f in res["fetched"] if "error" not in f]
    failed = [f for f in res["fetched"] if "error" in f]
    fetch_report(args, got, failed)


async def cmd_fetch(args, base: Path) -> None:
    """Download, open and confirm waiting items (all, or the ones named)."""
    key = load_key(args, base)
    st = need_registration(base)
    out_dir = Path(args.out) if args.out else base / daemon.INBOX_DIR
    got, failed = [], []
    for url in await mailbox.federation_cs_urls(st["dc_url"], args.timeout, keys.parse_node_id(st["dc"])):
        async with cs_client.CsClient(key, url) as cs:
            for entry in await cs.inbox():
                if args.items and entry["item"] not in args.items:
                    continue
                if args.out is None and (full := consent.inbox_room(entry["size"], mailbox.inbox_bytes(out_dir))):
                    failed.append(
                        {"item": entry["item"], "error": full, "message": mailbox.inbox_full_message(entry["size"])}
                    )
                    continue
                try:
                    got.append((await cs.fetch(entry["item"], out_dir)).describe())
                except cs_client.CsClientError as exc:
                    failed.append({"item": entry["item"], "error": exc.code, "message": str(exc)})
    fetch_report(args, got, failed)


def fetch_report(args, got: list[dict], failed: list[dict]) -> None:
    esc = consent.escape
    lines = [
        f"{g['item']} from {g['sender']} ({esc(g['app_id'])}): {esc(g['notice'] or g['name'])} -> {g['path']}"
        for g in got
    ]
    lines += [f"{esc(f['item'])}: refused: {f['message']}" for f in failed]
    out(args, {"fetched": got, "failed": failed}, "\n".join(lines) or "(nothing waiting)")
    if failed:
        raise CliError(f"{len(failed)} item(s) not fetched; they stay at their Cache Server until they expire")


async def cmd_nc(args, base: Path) -> None:
    """stdin/stdout ⇄ a stream to the peer's port, through the daemon (node/stream_cli.py)."""
    await stream_cli.nc(base, peer_arg(base, args.node), args.port, sys.stdin.buffer, sys.stdout.buffer)


async def cmd_serve(args, base: Path) -> None:
    """Serve a local TCP service to allowed peers until Ctrl-C, through the daemon."""
    try:
        parse_local_target(args.to)
    except control.ControlError as exc:
        raise CliError(str(exc), USAGE) from None

    def show(ev: dict) -> None:
        if "ok" in ev:
            event(args, ev, f"serving port {ev['port']} to allowed nodes → {ev['to']} (Ctrl-C stops)")
        else:
            event(args, ev, f"stream from {ev['stream']}" + (f": {ev['error']}" if "error" in ev else ""))

    await stream_cli.serve(base, args.port, args.to, show)


async def cmd_recv(args, base: Path) -> None:
    if args.wait < 0:
        raise CliError("--wait must be >= 0", USAGE)
    res = await ask(base, "recv", {"wait": args.wait}, timeout=30 + args.wait)
    out(args, res, "\n".join(f"{m['peer']}: {consent.escape(m['text'])}" for m in res["messages"]) or "(nothing)")


async def cmd_group(args, base: Path) -> None:
    """`ntm group ...`: through the daemon, which holds the group keys and receives group traffic."""
    body: dict = {
        k: v
        for k, v in (
            ("group", getattr(args, "group", None)),
            ("name", getattr(args, "name", None)),
            ("text", getattr(args, "text", None)),
        )
        if v is not None
    }
    if getattr(args, "node", None) is not None:
        body["node"] = peer_arg(base, args.node)
    if args.group_cmd == "send" and len(args.text.encode()) > 1024:
        raise CliError("a group message is at most 1024 bytes (send larger content with `ntm send --offline`)", USAGE)
    if args.group_cmd == "recv":
        if args.wait < 0:
            raise CliError("--wait must be >= 0", USAGE)
        body["wait"] = args.wait
    res = await ask(base, f"group.{args.group_cmd}", body, timeout=60 + body.get("wait", 0))
    out(args, res, group_text(args.group_cmd, res))


def group_text(cmd: str, r: dict) -> str:
    esc = consent.escape

    def line(g: dict) -> str:
        key = "key ready" if g["has_key"] else "waiting for the admin's RN1"
        return (
            f"{esc(g['name'])}  {g['gid']}  {g['status']}, epoch {g['epoch']}, {len(g['members'])} members, {key}"
            f"{' (you are its admin)' if g['admin'] == g['you'] else ''}"
        )

    if cmd == "recv":
        return "\n".join(f"[{esc(m['group'])}] {m['sender']}: {esc(m['text'])}" for m in r["messages"]) or "(nothing)"
    if cmd == "invitations":
        return (
            "\n".join(
                f"{esc(g['name'])}  {g['gid']}  from {g['admin']}{'' if g['admitted'] else ' (not on your allow list)'}"
                f"  at {esc(g['gms'])}"
                for g in r["invitations"]
            )
            or "(no invitations)"
        )
    if cmd == "decline":
        return f"declined the invitation to {esc(r['name'])} ({r['gid']}) from {r['admin']}"
    if cmd == "members" and "groups" in r:
        return "\n".join(line(g) for g in r["groups"]) or "(no groups)"
    if cmd == "send":
        return (
            f"sent to {r['name']} (epoch {r['epoch']}): {len(r['tunnel'])} over tunnels, {len(r['cs'])} left at "
            f"a Cache Server, {len(r['failed'])} failed"
            + (f"\nwarning: {r['gms_unreachable']}" if "gms_unreachable" in r else "")
        )
    text = line(r)
    if cmd == "invite":
        text += f"\ninvited {r['invited']} (invitation {'sent over a tunnel' if r['via'] == 'tunnel' else 'left at a Cache Server' if r['via'] == 'cs' else 'not delivered'})"
    if cmd == "members":
        text += "\n" + "\n".join(
            f"  {m}{'  (admin)' if m == r['admin'] else ''}{'  (you)' if m == r['you'] else ''}" for m in r["members"]
        )
    return text


async def edit_peers(args, base: Path, change) -> PeerBook:
    """Apply `change` to peers.json and tell a running daemon to re-read it."""
    try:
        book = PeerBook.load(base)
        change(book)
    except PeerBookError as exc:
        raise CliError(str(exc), USAGE) from None
    book.save(base)
    try:
        await control.call(base, "reload")
    except control.ControlError:
        pass  # no daemon: it reads the file when it starts
    return book


async def cmd_alias(args, base: Path) -> None:
    if args.name is None:
        book = PeerBook.load(base)
        out(
            args,
            {"aliases": {n: keys.checksum(i) for n, i in book.aliases.items()}},
            "\n".join(f"{n}.ntm  {keys.checksum(i)}" for n, i in sorted(book.aliases.items())) or "(no aliases)",
        )
        return
    if args.node is None:
        await edit_peers(args, base, lambda b: b.aliases.pop(args.name.lower(), None))
        out(args, {"removed": args.name}, f"alias {args.name} removed")
        return
    nid = node_arg(args.node)
    await edit_peers(args, base, lambda b: b.set_alias(args.name, nid))
    out(
        args,
        {"alias": args.name.lower(), "node": keys.checksum(nid)},
        f"{args.name.lower()}.ntm is {keys.checksum(nid)}",
    )


async def cmd_allow(args, base: Path) -> None:
    if args.node is None:
        book = PeerBook.load(base)
        out(
            args,
            {"allow": sorted(keys.checksum(i) for i in book.allow)},
            "\n".join(keys.checksum(i) for i in sorted(book.allow)) or "(nobody: only outbound tunnels)",
        )
        return
    nid = keys.parse_node_id(peer_arg(base, args.node))
    if args.remove:
        await edit_peers(args, base, lambda b: b.allow.discard(nid))
        out(args, {"removed": keys.checksum(nid)}, f"{keys.checksum(nid)} may no longer open tunnels to this node")
    else:
        await edit_peers(args, base, lambda b: b.allow.add(nid))
        out(args, {"allowed": keys.checksum(nid)}, f"{keys.checksum(nid)} may open tunnels to this node")

"""`ntm`: the node's command line. Human-readable output by default, `--json` for scripts.

Exit codes: 0 ok, 1 refused or failed (the message says why), 2 usage or local file problems.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from urllib.parse import urlsplit

from node import state
from node.agent import local_addrs_towards
from node.dc_client import DcClient, DcError, dc_url
from ntm import keys
from ntm.errors import KeystoreError, NtmError
from ntm.record import Domain, NodeTransaction
from ntm.registration import RegistrationRequest

TUNNEL_PORT = 4330  # the seeds' NTM port


class CliError(Exception):
    """A failure to report as one line and exit code `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def load_key(base: Path):
    try:
        return keys.load_keystore(base / state.KEY_FILE, state.passphrase())
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
    keys.save_keystore(key, path, state.passphrase())
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
        if st.get("chain_id") and (st["chain_id"], st["registry"]) != (info["chain_id"], info["registry"]):
            raise CliError(
                f"DC at {url} is on chain {info['chain_id']} registry {info['registry']}, but this node is "
                f"registered on chain {st['chain_id']} registry {st['registry']}"
            )
        domain = Domain(info["chain_id"], keys.parse_node_id(info["registry"]))
        # Strictly increasing even if the clock stepped back or two commands ran in one millisecond.
        ts = max(int(time.time() * 1000), st.get("timestamp", 0) + 1)
        rec = NodeTransaction(keys.node_id_of(key), keys.parse_node_id(info["dc"]), ts, revoked)
        req = RegistrationRequest(rec, rec.sign(key, domain), keys.public_bytes(key),
                                  tuple(args.addr or local_addrs_towards(urlsplit(url).hostname, TUNNEL_PORT)))
        res = await dc.register(req, wait_confirmed=not args.no_wait)
    state.write_json(base / state.STATE_FILE, {
        "dc_url": url, "dc": info["dc"], "hostname": info["hostname"], "chain_id": info["chain_id"],
        "registry": info["registry"], "timestamp": ts, "revoked": revoked, "status": res["status"],
        "block": res.get("block"), "tx": res.get("tx"),
    })
    what = "revoked" if revoked else "registered"
    where = f"block {res['block']}" if res.get("block") is not None else "chain confirmation pending"
    out(args, {**res, "dc_url": url, "hostname": info["hostname"]},
        f"{what} {res['node']} at DC {info['hostname']} ({info['dc']}, {url})\n"
        f"status: {res['status']} ({where})")


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
            data.update(dc_reachable=True, confirmed=seen.get("confirmed"), online=seen.get("online"),
                        revoked=seen.get("revoked", False), home_dc=seen.get("home_dc"))
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
    out(args, data, "\n".join(lines))


async def cmd_whois(args, base: Path) -> None:
    try:
        nid = keys.parse_node_id(args.node)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    url = pick_dc(args, base, state.read_json(base / state.STATE_FILE))
    async with DcClient(url) as dc:
        info = await dc.whois(nid)
    flags = "revoked" if info.get("revoked") else ("online" if info.get("online") else "offline")
    out(args, info, f"{info['node']}: home DC {info['home_dc']}, {flags}"
        + (f"\npublic key {info['pubkey']}" if info.get("pubkey") else ""))


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
    s = sub.add_parser("whois", help="look a node up through the DC federation")
    s.add_argument("node", help="node ID (0x…)")
    s.add_argument("--dc", help="DC to ask (default: this node's DC)")
    s.set_defaults(func=cmd_whois)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    base = args.home or state.home()
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

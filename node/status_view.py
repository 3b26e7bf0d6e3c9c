"""`ntm status`: what it prints, and its fast path. While the daemon runs, the daemon answers
(its node ID, its DC's view of the record, its peers) over the control socket with the standard
library only: no key is opened and nothing heavy imported, so the answer takes about as long as
`ntm --help`. Without a daemon, node/commands.py asks the DC itself and prints the same lines.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from node import state
from node.output import out

SOCKET_FILE = "ntm.sock"  # node/control.py's, which imports aiohttp: not imported here
# A running daemon answers `status` in milliseconds (its DC's whois is bounded by
# daemon.RECORD_TIMEOUT_S); past this the full path runs and reports why.
FAST_STATUS_TIMEOUT_S = 5.0


def ask_daemon(base: Path, name: str, timeout: float) -> dict:
    """One control request (POST /v1/<name>, body {}); OSError or ValueError if no daemon answers
    it with a JSON object. HTTP/1.0 by hand (the daemon's aiohttp answers it with a length and
    closes): importing http.client would cost this fast path a third of its time."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(base / SOCKET_FILE))
        sock.sendall(
            f"POST /v1/{name} HTTP/1.0\r\nHost: ntm\r\nContent-Type: application/json\r\n"
            "Content-Length: 2\r\n\r\n{}".encode()
        )
        answer = b"".join(iter(lambda: sock.recv(65536), b""))  # to the end: HTTP/1.0 closes
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        raise ValueError(f"the daemon's answer to {name} is not HTTP")
    data = json.loads(body)
    if not isinstance(data, dict) or "error" in data:
        raise ValueError(f"the daemon refused {name}")
    return data


def from_daemon(args, base: Path) -> bool:
    """Print `ntm status` from the running daemon; False if none answers (or the state file is not
    a registration): the full command then runs and says why."""
    try:
        st = state.read_state(base)
        if not st:
            return False
        d = ask_daemon(base, "status", FAST_STATUS_TIMEOUT_S)
    except (OSError, ValueError):
        return False
    data = {"node": d["node"], "registered": True, **st, **record_fields(d.get("record", {})), "daemon": d}
    out(args, data, status_text(data, st, d, None))
    return True


def record_fields(record: dict) -> dict:
    """The DC's view of our record (whois as JSON, or {"dc_error", "unreachable"}) as status fields."""
    if "dc_error" in record:
        return {"dc_reachable": not record.get("unreachable"), "dc_error": record["dc_error"]}
    if not record:
        return {}
    return {
        "dc_reachable": True,
        "confirmed": record["confirmed"],
        "online": record["online"],
        "revoked": record["revoked"],
        "home_dc": record["home_dc"],
    }


def status_text(data: dict, st: dict, d: dict | None, daemon_error: tuple[str, str] | None) -> str:
    """The lines of `ntm status` for a registered node: `d` is the daemon's status, else
    `daemon_error` is (code, message) of why there is none."""
    lines = [
        f"node ID   {data['node']}",
        f"DC        {st['hostname']} {st['dc']} at {st['dc_url']}"
        + ("" if data.get("dc_reachable") else "  (unreachable)"),
        f"chain     id {st['chain_id']}, registry {st['registry']}",
    ]
    if "home_dc" in data:
        state_word = "revoked" if data["revoked"] else ("confirmed on chain" if data["confirmed"] else "pending")
        lines.append(f"record    {state_word}, home DC {data['home_dc']}, online: {'yes' if data['online'] else 'no'}")
    elif "dc_error" in data:
        lines.append(f"record    unknown ({data['dc_error']})")
    if d is None:
        code, message = daemon_error or ("no_daemon", "")
        lines.append(
            f"daemon    not running ({message})"
            if code != "no_daemon"
            else "daemon    not running (`ntm up` keeps the node online)"
        )
        return "\n".join(lines)
    lines.append(
        f"daemon    pid {d['pid']}, up {d['uptime_s']:.0f} s, tunnel socket {d['local']}, "
        + (f"public {d['observed']}" if d.get("udp") is not False else "no UDP out (tunnels through relays over TCP)")
    )
    lines.append(
        f"overlay   {d['ipv6']}  {d['ipv4']}  "
        + (f"on {d['tun']}" if d["tun"] else "(no TUN)")
        + (f", DNS {', '.join(d['dns'])}" if d["dns"] else "")
    )
    lines += routes_lines(d["routes"])
    lines.append(peers_table(d["peers"]))
    return "\n".join(lines)


def routes_lines(r: dict) -> list[str]:
    """Subnet routes (§10.10): what this node offers, what it uses, and why some are not used."""
    offers = r["advertised"] + (["exit"] if r["exit_offered"] else [])
    lines = [f"offers    {', '.join(offers)}"] if offers else []
    lines += [f"uses      {', '.join(nets)} via {peer}" for peer, nets in r["accepted"].items()]
    lines += [f"not used  {net}: {why}" for net, why in r["refused"].items()]
    lines += [f"no offer  from {peer}: {why}" for peer, why in r["unknown"].items()]
    return lines


# IPv4 overlay addresses differ per machine (§10.2): said under the table, so that logs compare.
VIEW_NOTE = (
    "  IPv4 is per machine: VIRTUAL is the peer here, SEES YOU AS is this node there (as the peer says); "
    "IPv6 is the same on every node"
)


def peers_table(rows: list[dict]) -> str:
    """The daemon's open tunnels, one peer per line (like `wg show`)."""
    if not rows:
        return "peers     none"
    head = ("PEER", "VIRTUAL", "SEES YOU AS", "ROUTE", "OVER", "ENDPOINT", "MTU", "HANDSHAKE", "RX", "TX", "RTT")
    table, why = [head], []
    for r in rows:
        name = ",".join(r["names"]) or r["peer"][:12] + "…"
        seen = (r.get("sees_you_as") or {}).get("ipv4")  # None: not told yet (or a daemon from before VIEW)
        table.append(
            (
                name,
                f"{r['ipv6']} {r['ipv4']}",
                seen or "-",
                r["route"],
                r["transport"],
                r["endpoint"] or "-",
                mtu_text(r),
                f"{r['last_handshake_s']:.0f} s ago" if r["last_handshake_s"] is not None else "-",
                human_bytes(r["rx_bytes"]),
                human_bytes(r["tx_bytes"]),
                f"{r['rtt_ms']:.2f} ms" if r["rtt_ms"] is not None else "-",
            )
        )
        if r["route"] == "relay" and r["reason"]:
            why.append(f"  {name} is relayed: {r['reason']}")
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    return "\n".join(
        ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table] + why + [VIEW_NOTE]
    )


def mtu_text(r: dict) -> str:
    """A tunnel's path MTU as probed, with what it leaves inside: "1400/1339" (§7 "Path MTU")."""
    return f"{r['path_mtu']}/{r['inner_mtu']}" if r.get("path_mtu") else "-"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

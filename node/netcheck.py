"""`ntm netcheck`: what the network gives this node, as Tailscale's netcheck tells it
(docs/PROTOCOL.md §8.4): does UDP get out, what NAT the DCs see (endpoint-independent or not,
from the two keepalive ports), IPv4/IPv6, the round trip to each DC, whether each relay's TCP
stream (port 443) opens and how fast, and why each peer is relayed.

The daemon runs it: its DC session's keepalives are the UDP probe, and it knows its tunnels.
The report is plain data (`report()` is a pure function of what was measured), so the CLI prints
it as text or JSON.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

import aiohttp

from daemon import tlspin
from node.relay_stream import stream_tls_context
from ntm import keys
from ntm.addr import family
from ntm.clock import Clock
from ntm.route import Reach

# One probe (an HTTP round trip to a DC, a WebSocket opened to a relay) may take this long before
# the target counts as unreachable from here: a user waits for the whole report.
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Probe:
    target: str
    ok: bool
    ms: float | None = None
    error: str | None = None


async def _timed(target: str, attempt, clock: Clock) -> Probe:
    t0 = clock.now()
    try:
        await asyncio.wait_for(attempt, PROBE_TIMEOUT_S)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, tlspin.ChannelError) as exc:
        reason = "no answer within %.0f s" % PROBE_TIMEOUT_S if isinstance(exc, asyncio.TimeoutError) else str(exc)
        return Probe(target, False, None, reason or type(exc).__name__)
    return Probe(target, True, round((clock.now() - t0) * 1000, 2))


async def probe_dc(http: aiohttp.ClientSession, url: str, dc: bytes | None, clock: Clock) -> Probe:
    """One HTTP round trip to a DC (GET /healthz; any answer counts: it is reachable), over TLS
    pinned to its chain address `dc` (the first time, the binding check is part of the time)."""

    async def get() -> None:
        tls = await tlspin.ssl_for(http, url.rstrip("/"), dc, PROBE_TIMEOUT_S)
        async with http.get(url.rstrip("/") + "/healthz", ssl=tls) as r:
            await r.read()

    return await _timed(url, get(), clock)


async def probe_stream(http: aiohttp.ClientSession, url: str, clock: Clock) -> Probe:
    """Open and close a relay stream: TCP, the WebSocket upgrade (and TLS for wss://)."""

    async def open_close() -> None:
        ws = await http.ws_connect(url, ssl=False if url.startswith("ws:") else stream_tls_context())
        await ws.close()

    return await _timed(url, open_close(), clock)


def nat_kind(udp: bool | None, local: list[str], observed: str | None, observed_alt: str | None) -> str:
    """The NAT as the DCs see it: "none", "eim" (endpoint-independent mapping), "symmetric", or
    "unknown" (no keepalive reply: no UDP)."""
    if not udp:
        return "unknown"
    return Reach(tuple(local), observed, observed_alt).nat


def report(
    udp: bool | None,
    local: list[str],
    observed: str | None,
    observed_alt: str | None,
    dcs: list[Probe],
    relays: list[Probe],
    peers: list[dict],
) -> dict:
    """The netcheck answer, from what was measured."""
    fams = {family(e) for e in local + ([observed] if observed else [])}
    return {
        "udp": bool(udp),
        "nat": nat_kind(udp, local, observed, observed_alt),
        "observed": observed,
        "observed_alt": observed_alt,
        "ipv4": 4 in fams,
        "ipv6": 6 in fams,
        "local": local,
        "dcs": [asdict(p) for p in dcs],
        "relay_tcp": [asdict(p) for p in relays],
        "tcp_relay_ok": any(p.ok for p in relays),
        "peers": [
            {
                "peer": r["peer"],
                "names": r.get("names", []),
                "route": r["route"],
                "transport": r["transport"],
                "reason": r["reason"],
                "path_mtu": r.get("path_mtu"),
                "inner_mtu": r.get("inner_mtu"),
            }
            for r in peers
        ],
    }


async def run(session, peers: list[dict]) -> dict:
    """Measure and report; `session` is the node's DcSession (node/dc_session.py)."""
    dc_urls = {session.dc_url.rstrip("/"): session.dc_address}  # ours first, then each by its chain address
    for d in session.known_dcs:
        if d.endpoint:
            dc_urls.setdefault(d.endpoint.rstrip("/"), keys.parse_node_id(d.dc))
    async with aiohttp.ClientSession() as http:
        try:
            streams = (await asyncio.wait_for(session.dc.info(), PROBE_TIMEOUT_S)).relay_streams
        except Exception:  # noqa: BLE001 - no DC answer: the DC probes below say why
            streams = []
        clock = session.clock
        dcs, relays = await asyncio.gather(
            asyncio.gather(*(probe_dc(http, u, a, clock) for u, a in dc_urls.items())),
            asyncio.gather(*(probe_stream(http, u, clock) for u in streams)),
        )
    return report(
        session.udp, session.local_addrs(), session.observed, session.observed_alt, list(dcs), list(relays), peers
    )


def text(r: dict) -> str:
    """The report for people."""
    lines = [
        f"UDP       {'yes' if r['udp'] else 'no (blocked: tunnels go through relays over TCP)'}",
        f"NAT       {r['nat']}"
        + (
            f" (the DC sees {r['observed']}"
            + (
                f", its second port {r['observed_alt']}"
                if r["observed_alt"] and r["observed_alt"] != r["observed"]
                else ""
            )
            + ")"
            if r["observed"]
            else ""
        ),
        f"IPv4      {'yes' if r['ipv4'] else 'no'}",
        f"IPv6      {'yes' if r['ipv6'] else 'no'}",
    ]
    for p in r["dcs"]:
        lines.append(f"DC        {p['target']}  " + (f"{p['ms']:.1f} ms" if p["ok"] else f"unreachable: {p['error']}"))
    if not r["relay_tcp"]:
        lines.append("relay TCP none known (the DC names its relays' streams once it has probed them)")
    for p in r["relay_tcp"]:
        lines.append(f"relay TCP {p['target']}  " + (f"{p['ms']:.1f} ms" if p["ok"] else f"fails: {p['error']}"))
    for p in r["peers"]:
        name = ",".join(p["names"]) or p["peer"]
        why = f": {p['reason']}" if p["route"] == "relay" and p["reason"] else ""
        mtu = f", path MTU {p['path_mtu']} (inner {p['inner_mtu']})" if p.get("path_mtu") else ""
        lines.append(f"peer      {name}  {p['route']} over {p['transport']}{mtu}{why}")
    return "\n".join(lines)

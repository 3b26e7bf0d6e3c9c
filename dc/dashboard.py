"""The DC's dashboard: one read-only page (GET /dashboard, dc/dashboard.html) that polls one JSON
snapshot (GET /v1/dashboard) every DASHBOARD_REFRESH_S.

Who may see it: the operator's networks only (--admin-allow, default loopback), as /metrics. It
lists node IDs, who is online and who talks to whom: nothing a node or a stranger should read.

The snapshot: this DC; the federation (every DC on chain, its endpoint, whether it answers, probed
every PROBE_S); the chain (head, block age, gas balance, outbox); nodes (registered here, online,
and per home DC across the registry); the latest directions with their route kinds; relay usage.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from daemon import tlspin
from dc import status
from dc.cache import RegistryCache
from ntm import keys, messages
from ntm.clock import Clock
from ntm.errors import ParseError

PAGE = Path(__file__).with_name("dashboard.html")
DASHBOARD_REFRESH_S = 2.0  # what the page polls at: live enough, and one small JSON per 2 s
PROBE_S = 10.0  # each other DC's /healthz is asked this often
PROBE_TIMEOUT_S = 3.0
RECENT_DIRECTIONS = 50
NODES_LISTED = 100


@dataclass
class Probe:
    reachable: bool
    healthy: bool
    ms: float | None
    at: float
    error: str = ""


class Directions:
    """The latest Direction Requests this DC served or refused (for the page; metrics count them all)."""

    def __init__(self, clock: Clock, size: int = RECENT_DIRECTIONS) -> None:
        self.clock = clock
        self.recent: deque[dict] = deque(maxlen=size)

    def add(self, requester: bytes, peer: bytes, route: str, reason: str, ms: float) -> None:
        self.recent.appendleft(
            {
                "at": self.clock.wall_ms(),
                "requester": keys.checksum(requester),
                "peer": keys.checksum(peer),
                "route": route,
                "reason": reason,
                "ms": round(ms, 1),
            }
        )


class FederationProbe:
    """Asks every other active DC's /healthz every PROBE_S: reachable, healthy, round trip; and each
    relay's /v1/info for its stream URLs. Given the parts it reads and writes (dc/wiring.py's probe)."""

    def __init__(
        self, me: bytes, cache: RegistryCache, relays: list[str], relay_streams: dict[str, list[str]], clock: Clock
    ) -> None:
        self.me, self.cache, self.relays, self.relay_streams, self.clock = me, cache, relays, relay_streams, clock
        self.results: dict[bytes, Probe] = {}

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as http:
            while True:
                others = [d for d in self.cache.dcs.values() if d.active and d.address != self.me]
                await asyncio.gather(
                    *(self._probe(http, d.address, d.endpoint) for d in others),
                    *(self._relay(http, url) for url in self.relays),
                )
                await asyncio.sleep(PROBE_S)

    async def _relay(self, http: aiohttp.ClientSession, url: str) -> None:
        """Learn a relay's stream URLs (its /v1/info), for /v1/info's relay_streams."""
        try:
            target = tlspin.relay_target(url)  # over TLS pinned by --relay, as bookings are
            async with http.get(target.base + "/v1/info", ssl=target.ssl()) as r:
                info = await r.json()
            self.relay_streams[url] = messages.decode(messages.StreamUrls, info.get("streams", []))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, AttributeError, ParseError):
            pass  # unreachable or not a relay: what bookings told us stays

    async def _probe(self, http: aiohttp.ClientSession, dc: bytes, endpoint: str) -> None:
        clock = self.clock
        t0 = clock.now()
        try:
            tls = await tlspin.ssl_for(http, endpoint.rstrip("/"), dc, PROBE_TIMEOUT_S)  # pinned to its chain key
            async with http.get(endpoint.rstrip("/") + "/healthz", ssl=tls) as r:
                healthy = r.status == 200
            self.results[dc] = Probe(True, healthy, (clock.now() - t0) * 1000, clock.wall())
        except (aiohttp.ClientError, OSError, TimeoutError, tlspin.ChannelError) as exc:
            self.results[dc] = Probe(False, False, None, clock.wall(), str(exc) or type(exc).__name__)


def snapshot(c: Any, chain: Any, probe: FederationProbe, started: float) -> dict:
    """Everything the page shows: the DC's status (dc/status.py; no chain call, no network, work
    independent of the number of nodes) and the federation probe's results."""
    st = status.read(c, chain, NODES_LISTED)
    dcs = []
    for d in sorted(st.dcs, key=lambda d: d.hostname):
        p = probe.results.get(d.address)
        me = d.address == st.dc
        dcs.append(
            {
                "dc": keys.checksum(d.address),
                "hostname": d.hostname,
                "endpoint": d.endpoint,
                "active": d.active,
                "self": me,
                "reachable": True if me else (p.reachable if p else None),
                "healthy": None if me or p is None else p.healthy,
                "rtt_ms": round(p.ms, 1) if p and p.ms else None,
                "error": p.error if p else "",
                "nodes": st.live_per_dc.get(d.address, 0),
            }
        )
    nodes = [
        {
            "node": keys.checksum(n.node),
            "registered_ms": n.registered_ms,
            "revoked": n.revoked,
            "online": n.online,
            "observed": n.observed,
        }
        for n in st.nodes
    ]
    counted = st.counters
    return {
        "dc": {
            "dc": keys.checksum(st.dc),
            "hostname": st.hostname,
            "uptime_s": round(st.now_s - started),
            "active": st.active,
            "cs": st.cs,
        },
        "federation": dcs,
        "chain": {
            **st.chain,
            "outbox": st.outbox,
            "chain_id": st.chain_id,
            "registry": keys.checksum(st.registry),
        },
        "nodes": {
            "registered": st.nodes_stored,
            "online": st.sessions,
            "in_registry": sum(st.live_per_dc.values()),
            "list": nodes,
        },
        "directions": {
            "served": counted["directions_served"],
            "failed": counted["directions_failed"],
            "recent": st.recent_directions,
        },
        "relay": {
            "relays": st.relays,
            "bookings": counted["relay_bookings"],
            "failures": counted["relay_booking_failures"],
        },
        "refresh_s": DASHBOARD_REFRESH_S,
    }

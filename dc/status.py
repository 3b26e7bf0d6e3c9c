"""What an operator sees of one DC, read in one place: /metrics (dc/metrics.py) and the dashboard
(dc/dashboard.py) show a DcStatus instead of each reaching into the Coordinator's parts.

Reading it costs no chain call and no network, and work independent of the number of nodes:
counts are kept incrementally (registry cache, SQLite triggers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dc.chainstatus import ChainStatus
from ntm.registry import DcInfo

OUTBOX_STATES = ("pending", "confirmed", "rejected")


@dataclass(frozen=True)
class NodeRow:
    """One node registered here, as the dashboard lists it."""

    node: bytes
    registered_ms: int
    revoked: bool
    online: bool
    observed: str | None  # its NAT mapping, while it has a session


@dataclass(frozen=True)
class DcStatus:
    dc: bytes
    hostname: str
    cs: str | None  # this DC's Cache Server URL
    active: bool  # in the registry
    now_s: float  # the DC's monotonic clock when read
    sessions: int  # nodes online here
    nodes_stored: int  # nodes this DC is home to
    registry_nodes: int  # records in the registry cache (every DC's)
    live_per_dc: dict[bytes, int]  # unrevoked nodes per home DC
    dcs: list[DcInfo]  # every DC on chain
    outbox: dict[str, int]  # records per OUTBOX_STATES
    chain: dict  # ChainStatus.report(): health, head, block age, gas
    chain_id: int
    registry: bytes  # the registry contract's address
    new_node_budget: int  # new identities the gas budget allows now
    counters: dict[str, int]  # every part's counters, by name (dc/metrics.py's COUNTER_DOCS)
    recent_directions: list[dict]
    relays: list[str]
    nodes: list[NodeRow]  # the latest registered here, newest first


def read(c: Any, chain: ChainStatus, nodes_listed: int = 0) -> DcStatus:
    """The status now of Coordinator `c` (untyped: it holds the metrics, which read this; an import
    would be a cycle); with the `nodes_listed` latest nodes registered here."""
    now = c.clock.now()
    rows = [
        NodeRow(n.node, n.timestamp, n.revoked, s is not None, s.observed if s else None)
        for n in (c.store.recent_nodes(nodes_listed) if nodes_listed else [])
        for s in [c.presence.sessions.get(n.node)]
    ]
    return DcStatus(
        dc=c.address,
        hostname=c.hostname,
        cs=c.cs,
        active=c.cache.is_active_dc(c.address),
        now_s=now,
        sessions=len(c.presence.sessions),
        nodes_stored=c.store.node_count(),
        registry_nodes=len(c.cache.nodes),
        live_per_dc=dict(c.cache.live_per_dc),
        dcs=list(c.cache.dcs.values()),
        outbox={s: c.store.count_outbox(s) for s in OUTBOX_STATES},
        chain=chain.report(),
        chain_id=c.registry.chain_id,
        registry=c.registry.address,
        new_node_budget=int(c.new_node_budget.available(now)),
        counters={
            **c.counters,
            **c.signaling.counters,
            **c.notices.counters,
            **c.groups.counters,
            "chain_tx_sent": c.submitter.sent_tx,
            "chain_failures": c.submitter.failures,
            "outbox_reopened": c.submitter.reopened,
            "chain_rollbacks": c.cache.rollbacks,
            "keepalives_dropped": c.presence.dropped_keepalives,
        },
        recent_directions=list(c.directions.recent),
        relays=list(c.relays),
        nodes=rows,
    )

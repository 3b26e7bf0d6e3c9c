"""The DC's wiring root: build a Coordinator and hook its parts together, for dc/__main__.py and
for tests and benches alike (so none of them repeats the wiring)."""

from __future__ import annotations

import coincurve

from dc.cache import RegistryCache
from dc.coordinator import (
    NEW_NODE_COST_HALF_LIFE_S,
    NEW_NODE_TOKENS_PER_SOURCE,
    NEW_NODES_BURST,
    NEW_NODES_PER_HOUR,
    RATE_SOURCES_KEPT,
    REGISTRATIONS_PER_SOURCE,
    SESSIONS_UNAUTHENTICATED_PER_SOURCE,
    WHOIS_PER_SOURCE,
    Coordinator,
    Limits,
    Parts,
)
from dc.dashboard import Directions, FederationProbe
from dc.federation import FederationClient, Transport
from dc.groups import GroupService
from dc.metrics import DcMetrics
from dc.notices import Notices
from dc.presence import Presence
from dc.signaling import Signaling
from dc.store import Store
from dc.submitter import Submitter
from ntm import envelope
from ntm.clock import SYSTEM, Clock
from ntm.ratelimit import Buckets, Concurrency, RisingCost, TokenBucket
from ntm.registry import RegistryView


def limits(new_nodes_per_hour: float = NEW_NODES_PER_HOUR, new_nodes_burst: float = NEW_NODES_BURST) -> Limits:
    """The DC's limits at their tuned values; `new_nodes_*`: the gas budget for nodes it has never seen."""
    return Limits(
        Buckets(*REGISTRATIONS_PER_SOURCE, max_keys=RATE_SOURCES_KEPT),
        TokenBucket(new_nodes_per_hour / 3600, new_nodes_burst),
        RisingCost(
            NEW_NODE_TOKENS_PER_SOURCE / 3600, NEW_NODE_TOKENS_PER_SOURCE, NEW_NODE_COST_HALF_LIFE_S, RATE_SOURCES_KEPT
        ),
        Buckets(*WHOIS_PER_SOURCE, max_keys=RATE_SOURCES_KEPT),
        Concurrency(SESSIONS_UNAUTHENTICATED_PER_SOURCE),
    )


def build(
    key: coincurve.PrivateKey,
    registry: RegistryView,
    store: Store,
    cache: RegistryCache,
    hostname: str,
    relays: list[str],
    keepalive_ports: tuple[int, int],
    *,
    clock: Clock = SYSTEM,
    transport: Transport | None = None,
    new_nodes_per_hour: float = NEW_NODES_PER_HOUR,
    new_nodes_burst: float = NEW_NODES_BURST,
    confirmations: int = 1,
    cs: str | None = None,
) -> Coordinator:
    """A Coordinator with all its parts. `transport`: how federation requests leave (HTTP unless a
    test routes them in-process). `confirmations`: blocks deep before a record counts as confirmed
    (1 on anvil). `cs`: the URL of this DC's Cache Server, announced in /v1/info."""
    presence, metrics, guard = Presence(clock), DcMetrics(), envelope.ReplayGuard()
    submitter = Submitter(store, registry, cache, confirmations, clock, metrics.submit_lag.observe)
    federation = FederationClient(
        key,
        cache.is_active_dc,
        guard,
        clock,
        transport=transport,
        count=lambda call, outcome: metrics.federation_calls.labels(call, outcome).inc(),
    )
    notices = Notices(store, presence, cache.is_active_dc, guard, clock)
    budget = limits(new_nodes_per_hour, new_nodes_burst)
    parts = Parts(clock, presence, metrics, Directions(clock), submitter, guard, federation, notices, budget)
    coord = Coordinator(key, registry, store, cache, parts, hostname, relays, keepalive_ports, cs)
    coord.signaling = Signaling(coord)
    coord.groups = GroupService(store.db, coord.latest, clock)
    cache.on_rollback = submitter.recheck  # a rolled-back record is submitted again
    cache.on_revoked = presence.revoke  # a revocation from the chain ends the session here
    return coord


def probe(coord: Coordinator) -> FederationProbe:
    """The dashboard's federation probe over this Coordinator's registry cache, relays and clock."""
    return FederationProbe(coord.address, coord.cache, coord.relays, coord.relay_streams, coord.clock)

"""The DC's /metrics (prometheus_client, via daemon/metrics.py): latencies as histograms, the
parts' counters with their meaning, and the state an operator watches (chain, gas, outbox).
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client.core import Metric

from daemon.metrics import Metrics
from dc import status

COUNTER_DOCS = {
    "registrations_accepted": "Registration Requests accepted (durable)",
    "registrations_refused": "Registration Requests refused by the DC's checks",
    "registrations_rate_limited": "Registration Requests refused by the per-source rate limit",
    "federation_requests_served": "NTM Information Requests answered for other DCs",
    "federation_requests_refused": "NTM Information Requests refused",
    "directions_served": "Direction Requests that produced a route",
    "directions_failed": "Direction Requests refused or failed",
    "directions_rate_limited": "Direction Requests refused by the per-node rate limit",
    "directions_delivered": "Route Directions pushed to nodes with a session here",
    "directions_refused_by_peer": "pushed Route Directions the node refused (allow list, its rates)",
    "directions_unacknowledged": "pushed Route Directions the node did not acknowledge in time",
    "directions_offered": "Direction Offers from other DCs served: our node directed in one call",
    "relay_bookings": "relay paths booked at a relay server",
    "relay_booking_failures": "relay booking attempts a relay refused or did not answer",
    "cs_notices_accepted": "Cache Server notices stored for our nodes",
    "cs_notices_pushed": "Cache Server notices pushed on node sessions",
    "cs_notices_refused": "Cache Server notices refused",
    "group_requests": "GMS requests",
    "group_refused": "GMS requests refused",
    "group_rekeys": "group epochs started (joins, departures, removals)",
    "chain_tx_sent": "registerBatch transactions sent",
    "chain_failures": "submission attempts that failed (RPC errors, reverts, timeouts)",
    "outbox_reopened": "confirmed records sent again after a chain rollback",
    "chain_rollbacks": "chain reorganisations seen by the follower",
    "keepalives_dropped": "keepalive datagrams dropped (unknown token, malformed)",
}


class DcMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__("ntm_dc")
        self._status: status.DcStatus | None = None  # this scrape's, shared by its gauges
        self.registration_durable = self.histogram(
            "registration_durable_seconds", "Registration Request received → durable in SQLite (acknowledged)"
        )
        self.registration_confirmed = self.histogram(
            "registration_confirmed_seconds",
            "Registration Request received → confirmed on chain, for requests that wait",
        )
        self.submit_lag = self.histogram(
            "chain_submit_lag_seconds", "a record durable here → confirmed on chain (the outbox's lag)"
        )
        self.direction = self.histogram(
            "direction_seconds", "Direction Request → both Route Directions sent, by route kind", ("route",)
        )
        self.routes = self.counter("routes", "routes decided, by kind (direct, nat, punch, relay)", ("route",))
        self.refusals = self.counter("refusals", "requests refused, by what was asked and why", ("what", "reason"))
        self.federation_calls = self.counter(
            "federation_calls", "requests to other DCs and relays, by call and outcome", ("call", "outcome")
        )

    def collect(self) -> Iterable[Metric]:
        self._status = None  # read afresh at each scrape, once
        yield from super().collect()

    def watch(self, c: Any, chain: Any) -> None:
        """The state read at each scrape, as one DcStatus (dc/status.py) shared by the scrape's
        gauges: `c` the Coordinator (which holds these metrics: hence no type here, to keep the
        import graph acyclic), `chain` its ChainStatus."""

        def now() -> status.DcStatus:
            if self._status is None:
                self._status = status.read(c, chain)
            return self._status

        self.gauge("sessions", "nodes with a session (online) at this DC", lambda: now().sessions)
        self.gauge("nodes_stored", "nodes this DC is home to", lambda: now().nodes_stored)
        self.gauge("registry_nodes", "nodes in the registry cache (every DC's)", lambda: now().registry_nodes)
        self.labelled_gauge("outbox", "outbox records by state", "state", lambda: now().outbox)
        self.gauge("outbox_pending", "records waiting for the chain", lambda: now().outbox["pending"])
        self.gauge("chain_head", "newest block seen", lambda: now().chain["head"])
        self.gauge("registry_block", "registry events read up to this block", lambda: now().chain["read_to"])
        self.gauge("block_age_seconds", "age of the newest block (wall clock)", lambda: now().chain["block_age_s"])
        self.gauge(
            "gas_balance_wei", "the DC's balance for registerBatch transactions", lambda: now().chain["gas_balance_wei"]
        )
        self.gauge(
            "gas_low_below_wei", "balance under which health says gas low", lambda: now().chain["gas_low_below_wei"]
        )
        self.gauge("chain_ok", "1 when the chain is reachable and caught up", lambda: int(now().chain["chain"] == "ok"))
        self.gauge("dc_active", "1 when this DC is active in the registry", lambda: int(now().active))
        self.gauge(
            "new_node_budget",
            "new identities the gas budget allows right now (over all sources)",
            lambda: now().new_node_budget,
        )
        self.counters(lambda: now().counters, COUNTER_DOCS)

"""The Direction Coordinator's logic, free of HTTP: registration, lookups, federation answers.

dc/server.py turns HTTP/WebSocket/UDP into calls on this object. Its edges come in from outside
(registry, store, cache, federation transport, clock), so tests run it against in-memory fakes
(tests/fakes.py) as well as against a real chain and real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import coincurve

from dc.cache import RegistryCache
from dc.errors import NodeLookupError
from dc.federation import FederationClient, FederationError
from dc.dashboard import Directions
from dc.groups import GroupService
from dc.metrics import DcMetrics
from dc.notices import Notices
from dc.presence import Presence
from dc.signaling import Signaling
from dc.store import Store, StoredNode
from dc.submitter import Submitter
from ntm import envelope, keys, messages
from ntm.clock import Clock
from ntm.errors import NtmError
from ntm.ratelimit import Buckets, Concurrency, RisingCost, TokenBucket, source_prefix
from ntm.registration import RegistrationError, RegistrationRequest, check_request
from ntm.registry import RegistryView

log = logging.getLogger("ntm.dc")

# How long a Registration Request may wait for chain confirmation before the DC answers
# "durable, not yet confirmed": a few anvil blocks or one slow public-chain block.
CONFIRM_WAIT_S = 15.0
# Registration Requests one source address may send: a burst of 10 (a host with a few nodes, a
# retry), then one per 6 s. Refused with rate_limited before the signature is even checked.
REGISTRATIONS_PER_SOURCE = (1 / 6, 10.0)
RATE_SOURCES_KEPT = 10_000  # sources remembered (least recently seen forgotten first)
# Gas budget for new identities (each costs this DC ~60k gas on chain; updates and revocations
# of known nodes are not limited by it): a burst of 200, then 1,000 per hour. Beyond it new nodes
# are refused with over_budget; an operator raises it with more ETH to spend (Coordinator args).
NEW_NODES_PER_HOUR = 1000.0
NEW_NODES_BURST = 200.0
# New identities from one source network (ratelimit.source_prefix: a /24 or /56) cost 1, 2, 4, 8 …
# tokens of its own 16-token bucket (refilled 16 per hour), the count halving every hour: a household
# registers 4 devices at once, while 20 networks' sybil burst takes 80 of the 200, not all of them.
NEW_NODE_TOKENS_PER_SOURCE = 16.0
NEW_NODE_COST_HALF_LIFE_S = 3600.0
# Whois lookups one source address may make: a burst of 50 (a CS checking a crowd of uploaders,
# a CLI), then 5 per second. Each may cost a signed federation call to the node's home DC.
WHOIS_PER_SOURCE = (5.0, 50.0)
# Session WebSockets one source address may hold before they authenticate: a NAT with a few nodes
# reconnecting at once needs a handful (auth takes one round trip); a flood is refused with 429.
SESSIONS_UNAUTHENTICATED_PER_SOURCE = 8


@dataclass(frozen=True)
class Parts:
    """The Coordinator's collaborators, built and hooked together by dc/wiring.py (the wiring
    root), so each can be built alone, faked or replaced in a test."""

    clock: Clock
    presence: Presence
    metrics: DcMetrics
    directions: Directions  # the latest ones, for the dashboard
    submitter: Submitter
    guard: envelope.ReplayGuard  # one for all envelopes this DC opens
    federation: FederationClient
    notices: Notices
    limits: Limits


@dataclass(frozen=True)
class Limits:
    """What outsiders may cost this DC: its rate limiters and its gas budget for new nodes."""

    registrations: Buckets  # per source address
    new_node_budget: TokenBucket
    new_node_cost: RisingCost  # per source network
    whois: Buckets  # per source address
    unauthenticated: Concurrency  # session WebSockets per source before they authenticate


class Coordinator:
    """One DC's state and decisions. Built by dc/wiring.py's build(), which also gives it its
    `signaling` and `groups` (they call back into it)."""

    signaling: Signaling
    groups: GroupService

    def __init__(
        self,
        key: coincurve.PrivateKey,
        registry: RegistryView,
        store: Store,
        cache: RegistryCache,
        parts: Parts,
        hostname: str,
        relays: list[str],
        keepalive_ports: tuple[int, int],
        cs: str | None = None,
    ) -> None:
        """`cs`: the URL of this DC's Cache Server, announced in /v1/info."""
        self.key = key
        self.address = keys.node_id_of(key)
        self.registry = registry
        self.store = store
        self.cache = cache
        self.hostname = hostname
        self.relays = relays
        self.relay_streams: dict[str, list[str]] = {}  # relay control URL → its stream URLs (§8.4)
        self.keepalive_ports = keepalive_ports
        self.clock = parts.clock
        self.presence = parts.presence
        self.metrics = parts.metrics
        self.directions = parts.directions
        self.submitter = parts.submitter
        self.guard = parts.guard
        self.federation = parts.federation
        self.notices = parts.notices
        self.cs = cs
        self.tls: messages.TlsBinding | None = None  # set when serving over TLS: /v1/info hands it out
        self.source_rate = parts.limits.registrations
        self.new_node_budget = parts.limits.new_node_budget
        self.new_node_cost = parts.limits.new_node_cost
        self.whois_rate = parts.limits.whois
        self.unauthenticated = parts.limits.unauthenticated
        self._node_locks: dict[bytes, asyncio.Lock] = {}
        self._node_users: dict[bytes, int] = {}
        self.counters = {
            "registrations_accepted": 0,
            "registrations_refused": 0,
            "registrations_rate_limited": 0,
            "federation_requests_served": 0,
            "federation_requests_refused": 0,
        }

    def info(self) -> messages.DcInfoReply:
        return messages.DcInfoReply(
            keys.checksum(self.address),
            self.hostname,
            self.registry.chain_id,
            keys.checksum(self.registry.address),
            list(self.keepalive_ports),
            self.relays,
            self.cache.is_active_dc(self.address),
            self.cs,
            [u for url in self.relays for u in self.relay_streams.get(url, [])],
            self.tls,
        )

    def latest(self, node: bytes) -> tuple[int, bool]:
        """Newest timestamp and revoked flag of `node` known here, on chain or still pending."""
        return self._latest(node, self.store.node(node))

    def _latest(self, node: bytes, stored: StoredNode | None) -> tuple[int, bool]:
        """latest() with `node`'s row already read (one SQLite query less per direction)."""
        onchain = self.cache.home_of(node)
        ts = max(onchain.timestamp if onchain else 0, stored.timestamp if stored else 0)
        revoked = bool((onchain and onchain.revoked) or (stored and stored.revoked))
        return ts, revoked

    @contextlib.asynccontextmanager
    async def _serialized(self, node: bytes):
        """One registration of a node at a time, from check to durable row: a second request is
        checked against the first once it is pending, so a revocation and a newer registration
        racing each other cannot both be accepted (the chain would take only one of them)."""
        lock = self._node_locks.setdefault(node, asyncio.Lock())
        self._node_users[node] = self._node_users.get(node, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._node_users[node] -= 1
            if not self._node_users[node]:
                del self._node_users[node], self._node_locks[node]

    async def register(
        self, req: RegistrationRequest, wait_confirmed: bool, source: str | None = None
    ) -> messages.RegisterResult:
        """Validate, store durably, queue for the chain; optionally wait for confirmation.
        `source`: the client's address, for the per-source rate limit."""
        started = self.clock.now()
        if not self.cache.is_active_dc(self.address):
            raise RegistrationError("dc_inactive", "this DC is not an active member of the registry")
        if source is not None and not self.source_rate.take(source, self.clock.now()):
            self.counters["registrations_rate_limited"] += 1
            raise RegistrationError("rate_limited", "too many registrations from this address; retry in a few seconds")
        async with self._serialized(req.record.node):
            latest, revoked = self.latest(req.record.node)
            try:
                check_request(req, self.address, self.registry.domain, self.clock.wall_ms(), latest, revoked)
                if latest == 0:
                    self._charge_new_node(source)
            except RegistrationError as exc:
                self.counters["registrations_refused"] += 1
                log.info(
                    "registration of %s (ts %d) refused: %s: %s",
                    keys.checksum(req.record.node),
                    req.record.timestamp,
                    exc.code,
                    exc,
                )
                raise
            await self.store.add(req)
        self.submitter.note_durable(req.record.node, req.record.timestamp)
        self.metrics.registration_durable.observe(self.clock.now() - started)
        self.counters["registrations_accepted"] += 1
        if req.record.revoked:  # durable here: the node's authority ends now, not at confirmation
            self.presence.revoke(req.record.node)
        self.submitter.wake()
        rec = req.record
        log.info(
            "%s %s (ts %d): durable",
            "revocation" if rec.revoked else "registration",
            keys.checksum(rec.node),
            rec.timestamp,
        )
        result = messages.RegisterResult(keys.checksum(rec.node), keys.checksum(self.address), rec.timestamp, "durable")
        if wait_confirmed:
            try:
                state, tx, block, reason = await asyncio.wait_for(
                    self.submitter.confirmed(rec.node, rec.timestamp), CONFIRM_WAIT_S
                )
            except asyncio.TimeoutError:
                return result
            result = messages.RegisterResult(result.node, result.dc, result.timestamp, state, tx, block, reason)  # type: ignore[arg-type]
            if state == "confirmed":
                self.metrics.registration_confirmed.observe(self.clock.now() - started)
        return result

    def _charge_new_node(self, source: str | None) -> None:
        """A never-seen identity costs its source network a rising price (RisingCost), then one
        unit of the DC's shared gas budget; refused with rate_limited or over_budget."""
        now = self.clock.now()
        if source is not None and not self.new_node_cost.take(source_prefix(source), now):
            raise RegistrationError(
                "rate_limited", "too many new identities from this network; retry in an hour or register at another DC"
            )
        if not self.new_node_budget.take(now):
            raise RegistrationError(
                "over_budget",
                "this DC's gas budget for new nodes is spent for now; retry later or register at another DC",
            )

    def local_info(self, node: bytes) -> messages.NodeInfo | None:
        """What this DC knows of a node it is home to (for federation answers and whois)."""
        stored = self.store.node(node)
        if stored is None:
            return None
        session = self.presence.sessions.get(node)
        observed, observed_alt = self.presence.observed(node)
        return messages.NodeInfo(
            node=keys.checksum(node),
            home_dc=keys.checksum(self.address),
            timestamp=stored.timestamp,
            # the chain's outcome counts too: a revocation that landed (here or through another DC)
            # is final even if a newer record of ours is still in the table
            revoked=self._latest(node, stored)[1],
            online=self.presence.online(node),
            pubkey=stored.pubkey.hex(),
            local_addrs=list(session.local_addrs if session and session.local_addrs else stored.local_addrs),
            observed=observed,
            observed_alt=observed_alt,
            routes=session.routes if session else None,
        )

    def answer_ntm_info(self, request: dict) -> dict:
        """Serve a signed NTM Information Request from a peer DC; returns the signed response."""
        try:
            _, req = envelope.open_body(
                request,
                messages.INFO_REQUEST,
                messages.InfoRequest,
                self.clock.wall_ms(),
                self.cache.is_active_dc,
                self.guard,
            )
            if keys.parse_node_id(req.to) != self.address:
                raise NodeLookupError("wrong_dc", "request is addressed to another DC")
        except NtmError:
            self.counters["federation_requests_refused"] += 1
            raise
        info = self.local_info(keys.parse_node_id(req.node))
        if info is None:
            raise NodeLookupError("unknown_node", f"{req.node} is not registered at this DC")
        self.counters["federation_requests_served"] += 1
        return self.federation.seal(messages.INFO_RESPONSE, info)

    async def locate(self, node: bytes) -> tuple[bytes, messages.NodeInfo | None]:
        """Where `node` lives: (this DC, its info) if we are its home (or hold a newer record than
        the chain); (its home DC, a revoked info) for a revoked chain record; else (its active home
        DC, None): only that DC knows more. NodeLookupError as lookup()."""
        onchain = await self.cache.resolve(node)
        stored = self.store.node(node)
        if stored and (onchain is None or stored.timestamp >= onchain.timestamp):
            info = self.local_info(node)
            assert info is not None
            info.confirmed = bool(onchain and onchain.timestamp == stored.timestamp)
            return self.address, info
        if onchain is None and not self.cache.caught_up:  # it may be in the logs not read yet
            raise NodeLookupError("catching_up", "this DC is still reading the registry from the chain; retry shortly")
        if onchain is None:
            raise NodeLookupError("unknown_node", f"{keys.checksum(node)} is not registered")
        if onchain.revoked:
            return onchain.dc, messages.NodeInfo(
                node=keys.checksum(node),
                home_dc=keys.checksum(onchain.dc),
                timestamp=onchain.timestamp,
                revoked=True,
                online=False,
                confirmed=True,
            )
        home = self.cache.dcs.get(onchain.dc)
        if home is None or not home.active:
            raise NodeLookupError("home_dc_inactive", f"home DC {keys.checksum(onchain.dc)} is not active")
        return onchain.dc, None

    async def lookup(self, node: bytes) -> tuple[messages.NodeInfo, bytes]:
        """Where `node` lives and what its home DC knows of it: from here if we are its home (or
        hold a newer record than the chain), else by an NTM Information Request to its home DC.
        Returns (info, home DC address). A revoked record is returned with revoked=True; a node
        nobody can answer for raises NodeLookupError (catching_up while the cache is incomplete)."""
        home, info = await self.locate(node)
        if info is not None:
            return info, home
        try:
            info = await self.federation.ntm_info(self.cache.dcs[home].endpoint, home, node)
        except FederationError as exc:
            raise NodeLookupError("home_dc_unreachable", str(exc)) from None
        if info.pubkey is None or keys.node_id(bytes.fromhex(info.pubkey)) != node:
            raise NodeLookupError("bad_pubkey", "the home DC returned a public key that is not the node's")
        info.confirmed = True
        return info, home

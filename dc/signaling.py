"""Direction Requests: a node asks its DC for a route to a peer; the DC directs both ends.

The requester's DC gets the peer's key and addresses (locally or by an NTM Information Request
to the peer's home DC), decides the route (ntm/route.py), books a relay path as fallback, and signs
a Route Direction for each node: the peer's is pushed (through the peer's home DC) first and
acknowledged (it follows the path, or refuses it: allow list, rate), then the requester's goes in
the one reply to its request, so a refusal reaches the requester at once and hands it nothing to
follow (nodes from before that get the old pair: pushed, then the result). docs/PROTOCOL.md §8.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Protocol

from dc.cache import RegistryCache
from dc.errors import DirectionError, NodeLookupError
from dc.federation import FederationClient, FederationError
from dc.presence import Presence
from ntm import envelope, keys, messages
from ntm.addr import family, url_family
from ntm.clock import Clock
from ntm.errors import SignatureError
from ntm.packet import relay_side_key
from ntm.ratelimit import Buckets
from ntm.route import Reach, Route, decide

log = logging.getLogger("ntm.dc.signaling")

PATH_ID_LEN = 8
RELAY_TOKEN_LEN = 32
# Direction Requests one node may send: a burst of 20 (opening tunnels to many peers at start),
# then 2 per second (new peers, repairs, leaving the relay). More is refused with rate_limited
# before any lookup, federation call or relay booking.
DIRECTIONS_PER_NODE = (2.0, 20.0)
# Nodes whose request rate is remembered (least recently active forgotten first: bounded memory).
RATE_NODES_KEPT = 10_000
# A relayed path lives at most an hour and carries at most 1 GiB; the nodes ask again after that.
RELAY_LIFETIME_MS = 3600 * 1000
RELAY_MAX_BYTES = 1 << 30
# A node acknowledges a pushed Route Direction from its event loop as soon as it has decided
# (allow list, rates), before any handshake: milliseconds. 2 s leaves room for a loaded host and
# stays under the federation timeout (3 s), so a peer's home DC answers the requester's DC in time.
DIRECTION_ACK_TIMEOUT_S = 2.0
# Pushes waiting for their ack, over all sessions. Each is an in-flight push for a rate-limited
# Direction Request (or a delivery from an active DC) and lives at most DIRECTION_ACK_TIMEOUT_S;
# the cap bounds memory even so, refusing further pushes (dc_busy) rather than queueing them.
PENDING_ACKS_MAX = 10_000
# What the requester is told when the peer refuses (the node sends only the code).
PEER_REFUSALS = {
    "not_allowed": "{peer} does not accept tunnels from this node (its allow list)",
    "peer_busy": "{peer} refused the direction: too many directions from this node or in all; retry in 2 s",
}


def reach_of(info: messages.NodeInfo) -> Reach:
    return Reach(tuple(info.local_addrs), info.observed, info.observed_alt)


@dataclass(frozen=True)
class End:
    """One end of a path: the node, the DC that directs it, its key and where it is reachable."""

    node: bytes
    home_dc: bytes
    pubkey: str | None  # None only for a revoked record, which is never directed
    reach: Reach

    @classmethod
    def of(cls, info: messages.NodeInfo, home_dc: bytes) -> End:
        return cls(keys.parse_node_id(info.node), home_dc, info.pubkey, reach_of(info))


@dataclass(frozen=True)
class PathFacts:
    """What the two Route Directions of one path share."""

    path: bytes
    route: Route
    requester: bytes
    resume: bytes | None


ROLES = {  # route kind and initiator → (requester's role, peer's role)
    ("direct", "a"): ("initiate", "wait"),
    ("nat_initiates", "a"): ("initiate", "wait"),
    ("nat_initiates", "b"): ("wait", "initiate"),
    ("punch", "both"): ("punch", "punch"),
    ("relay", None): ("initiate", "wait"),
}

RelayBooking = tuple[bytes, list[str], list[str]]  # (path token, the relay's UDP endpoints, its stream URLs)


def relay_grant(relay: RelayBooking | None, side: int, reach: Reach) -> messages.RelayGrant | None:
    """One end's grant on a booked relay path: the relay's endpoints and stream URLs this end can
    use (by IP family; all if none fits) and only its own side's key: it cannot bind as the other
    side (§8.2)."""
    if relay is None:
        return None
    token, endpoints, streams = relay
    fams = reach.families()
    usable = [e for e in endpoints if family(e) in fams] or endpoints
    usable_streams = [u for u in streams if url_family(u) in fams | {None}] or streams
    return messages.RelayGrant(usable, relay_side_key(token, side).hex(), side, usable_streams)  # type: ignore[arg-type]


class Directory(Protocol):
    """What signaling needs from its DC (dc/coordinator.py's Coordinator)."""

    address: bytes
    relays: list[str]
    relay_streams: dict[str, list[str]]
    clock: Clock
    cache: RegistryCache
    presence: Presence
    federation: FederationClient
    guard: envelope.ReplayGuard

    def local_info(self, node: bytes) -> messages.NodeInfo | None: ...

    def latest(self, node: bytes) -> tuple[int, bool]: ...

    async def locate(self, node: bytes) -> tuple[bytes, messages.NodeInfo | None]: ...


class Signaling:
    def __init__(self, coordinator: Directory) -> None:
        self.c = coordinator
        self.counters = {
            "directions_served": 0,
            "directions_failed": 0,
            "directions_delivered": 0,
            "directions_rate_limited": 0,
            "directions_refused_by_peer": 0,
            "directions_unacknowledged": 0,
            "directions_offered": 0,
            "relay_bookings": 0,
            "relay_booking_failures": 0,
        }
        self.rate = Buckets(*DIRECTIONS_PER_NODE, max_keys=RATE_NODES_KEPT)
        # (node, path) → the push waiting for that node's DirectionAck: the node's refusal or None
        self._acks: dict[tuple[bytes, bytes], asyncio.Future[str | None]] = {}
        self.impostors: set[str] = set()  # relays whose certificate is not their pin, logged once each

    def check_peer(self, peer: bytes, info: messages.NodeInfo) -> None:
        """DirectionError unless our node `peer` may be directed: not revoked (`info` is local_info's,
        which counts the chain's and the pending records) and online."""
        if info.revoked:
            raise DirectionError("revoked", f"{keys.checksum(peer)} is revoked")
        if not info.online:
            raise DirectionError("offline", f"{keys.checksum(peer)} is offline (no session at its DC)")

    async def book_relay(self, path: bytes, nodes: list[bytes]) -> RelayBooking | None:
        """Book a relay path at the first relay that accepts; (token, UDP endpoints, stream URLs) or None."""
        token = os.urandom(RELAY_TOKEN_LEN)
        body = messages.RelayDirection(
            path.hex(),
            token.hex(),
            [keys.checksum(n) for n in nodes],
            self.c.clock.wall_ms() + RELAY_LIFETIME_MS,
            RELAY_MAX_BYTES,
        )
        for url in self.c.relays:
            try:
                answer = await self.c.federation.book_relay(url, body)
            except FederationError as exc:
                self.counters["relay_booking_failures"] += 1
                if exc.code != "relay_unauthenticated":
                    log.warning("relay %s refused path: %s", url, exc)
                elif url not in self.impostors:  # once: every booking tries it again, as for a relay down
                    self.impostors.add(url)
                    log.error('%s: treated as down (§5 "The relay\'s control channel")', exc)
                continue
            self.impostors.discard(url)
            self.counters["relay_bookings"] += 1
            self.c.relay_streams[url] = list(answer.streams)
            return token, list(answer.relay), list(answer.streams)
        return None

    def direction(
        self, facts: PathFacts, to: End, role: str, grant: messages.RelayGrant | None, peer: End
    ) -> messages.SignedEnvelope:
        """The signed Route Direction for end `to` of the path (towards `peer`), to be pushed by
        `to`'s home DC. The two ends' directions are this, mirrored."""
        assert peer.pubkey is not None
        candidates = peer.reach.verified_candidates(to.reach)
        relayed = facts.route.kind == "relay"
        body = messages.RouteDirection(
            path=facts.path.hex(),
            kind=facts.route.kind,
            reason=facts.route.reason,
            role=role,  # type: ignore[arg-type]
            node=keys.checksum(to.node),
            home_dc=keys.checksum(to.home_dc),
            peer=keys.checksum(peer.node),
            peer_pubkey=peer.pubkey,
            requester=keys.checksum(facts.requester),
            candidates=[] if relayed else candidates[0],
            unverified=[] if relayed else candidates[1],
            relay=grant,
            resume=facts.resume.hex() if facts.resume is not None else None,
        )
        return envelope.signed(self.c.federation.seal(messages.ROUTE_DIRECTION, body))

    async def request(
        self,
        requester: bytes,
        peer: bytes,
        force_relay: bool = False,
        resume: bytes | None = None,
        direct_only: bool = False,
        inline: bool = False,
    ) -> tuple[messages.RouteChoice, messages.SignedEnvelope | None]:
        """Serve a Direction Request from `requester` (who holds a session here). `force_relay`:
        the node asks for the relay (e.g. it knows its network blocks direct UDP). `direct_only`:
        a direct path or nothing, no relay booked (a relayed tunnel trying to move off the relay,
        §8.3). `resume`: the
        path ID of a tunnel between the two that stopped working; both directions carry it so
        both nodes move that tunnel onto the new path (§8.3). A peer at another DC costs one
        federation call, a Direction Offer: its home DC decides and directs its end (§8.5).
        `inline`: the one-reply form, the requester's Route Direction is returned (for the result)
        once the peer has accepted its own; otherwise it is pushed (the old pair) and None returned."""
        c = self.c
        started = c.clock.now()
        if not self.rate.take(requester, c.clock.now()):
            self.counters["directions_rate_limited"] += 1
            raise DirectionError("rate_limited", "too many direction requests from this node; retry in a second")
        try:
            if peer == requester:
                raise DirectionError("self", "a node cannot open a tunnel to itself")
            me = c.local_info(requester)
            if me is None:
                raise DirectionError("not_home", "the requester is not registered at this DC")
            if me.revoked:  # local_info counts the chain's and the pending records (latest)
                raise DirectionError("revoked", "the requester is revoked")
            path = os.urandom(PATH_ID_LEN)
            try:
                home, info = await c.locate(peer)
            except NodeLookupError as exc:
                raise DirectionError(exc.code, str(exc)) from None
            mode = "relay" if force_relay else "direct" if direct_only else None
            if info is None:  # the peer's home DC directs its end
                if c.latest(peer)[1]:  # a revocation we hold (pending here) that its home DC may not
                    raise DirectionError("revoked", f"{keys.checksum(peer)} is revoked")
                answer = await self.offer(home, path, me, peer, mode, resume)
                info, later = answer.peer, answer.deliver
                route, role_a, grant_a = Route(answer.kind, None, answer.reason), answer.role, answer.relay
            else:
                route, role_a, grant_a, later = await self.direct_peer(path, me, info, mode, resume)
            facts = PathFacts(path, route, requester, resume)
            dir_a = self.direction(facts, End.of(me, c.address), role_a, grant_a, End.of(info, home))
            if inline:  # one reply: the requester's direction goes in it, once the peer accepted its own
                if later is not None:  # the peer starts; the requester's node keeps its early Requests (§8.1)
                    await self.deliver_to(home, peer, later, path)
            elif later is not None:  # the old pair; the peer starts the handshake: the requester listens first
                await self.push(requester, dir_a, path)
                try:
                    await self.deliver_to(home, peer, later, path)
                except DirectionError as exc:
                    exc.abandoned = path  # the requester follows it already: its node drops it
                    raise
            else:  # the peer listens already (it acknowledged its direction)
                await self.push(requester, dir_a)  # no ack needed: the result follows on its session
        except DirectionError as exc:
            self.counters["directions_failed"] += 1
            c.directions.add(requester, peer, "refused", exc.code, (c.clock.now() - started) * 1000)
            raise
        self.counters["directions_served"] += 1
        c.metrics.routes.labels(route.kind).inc()
        c.metrics.direction.labels(route.kind).observe(c.clock.now() - started)
        c.directions.add(requester, peer, route.kind, route.reason, (c.clock.now() - started) * 1000)
        # debug: one line per direction at 2,000/s is ~35 GB of log a day; the dashboard keeps recent ones
        log.debug(
            "route %s → %s: %s (%s), path %s",
            keys.checksum(requester),
            keys.checksum(peer),
            route.kind,
            route.reason,
            path.hex(),
        )
        return messages.RouteChoice(path.hex(), route.kind, route.reason, role_a), dir_a if inline else None

    async def direct_peer(
        self, path: bytes, me: messages.NodeInfo, info: messages.NodeInfo, mode: str | None, resume: bytes | None
    ) -> tuple[Route, str, messages.RelayGrant | None, dict | None]:
        """Direct our node `info` towards requester `me` on `path`: decide the route (`mode`:
        "relay" forced, "direct" only), book the relay, sign the peer's Route Direction and push it
        (waiting for its ack), unless the peer initiates: then it is returned, to be delivered
        once the requester listens. (route, requester's role, its relay grant, that direction)."""
        a, b = End.of(me, keys.parse_node_id(me.home_dc)), End.of(info, self.c.address)
        requester, peer, ra, rb = a.node, b.node, a.reach, b.reach
        self.check_peer(peer, info)
        route = Route("relay", None, "relay requested by the node") if mode == "relay" else decide(ra, rb)
        if mode == "direct" and route.kind == "relay":
            raise DirectionError("no_direct", f"no direct path: {route.reason}")
        # Booked only for a direction that proceeds (every route but direct-only gets the relay
        # as its fallback); an unused path is released by the RS (§8.2).
        relay = None if mode == "direct" else await self.book_relay(path, [requester, peer])
        if route.kind == "relay" and relay is None:
            raise DirectionError("no_relay", f"route needs a relay ({route.reason}) and none is available")
        role_a, role_b = ROLES[(route.kind, route.initiator)]
        dir_b = self.direction(PathFacts(path, route, requester, resume), b, role_b, relay_grant(relay, 1, rb), a)
        if role_b == "initiate":
            return route, role_a, relay_grant(relay, 0, ra), dir_b
        await self.push(peer, dir_b, path)
        return route, role_a, relay_grant(relay, 0, ra), None

    async def offer(
        self, home: bytes, path: bytes, me: messages.NodeInfo, peer: bytes, mode: str | None, resume: bytes | None
    ) -> messages.DirectionAnswer:
        """The Direction Offer to `peer`'s home DC `home`; its answer, or DirectionError with its
        refusal (or home_dc_unreachable)."""
        offer = messages.DirectionOffer(
            path.hex(),
            keys.checksum(home),
            keys.checksum(peer),
            me,
            mode,  # type: ignore[arg-type]
            resume.hex() if resume is not None else None,
        )
        try:
            return await self.c.federation.direction_offer(self.c.cache.dcs[home].endpoint, offer)
        except FederationError as exc:
            raise DirectionError(exc.code or "home_dc_unreachable", str(exc)) from None

    async def accept_offer(self, obj: dict) -> dict:
        """A peer DC's Direction Offer for one of our nodes (§8.5), a signed envelope: verify it,
        direct our node, and answer (signed) with what the requester's DC needs to direct its own."""
        c = self.c
        env, offer = envelope.open_body(
            obj, messages.DIRECTION_OFFER, messages.DirectionOffer, c.clock.wall_ms(), c.cache.is_active_dc, c.guard
        )
        return c.federation.seal(messages.DIRECTION_ANSWER, await self.direct_offer(env.sender, offer))

    async def accept_proven_offer(self, sender: bytes, obj: dict) -> dict:
        """A bare Direction Offer on a channel DC `sender` proved itself on (§8.6 "Proven channels"):
        answered bare; every check of a signed offer but the signature's, which the channel's proof
        and TLS stand for."""
        if not self.c.cache.is_active_dc(sender):  # removed since it proved itself
            raise SignatureError(f"{keys.checksum(sender)} is not an active DC")
        return messages.encode(await self.direct_offer(sender, messages.decode(messages.DirectionOffer, obj)))

    async def direct_offer(self, sender: bytes, offer: messages.DirectionOffer) -> messages.DirectionAnswer:
        """Direct our node as DC `sender`'s `offer` asks, unless a refusal rule of §8.5 applies."""
        c = self.c
        if keys.parse_node_id(offer.to) != c.address:
            raise NodeLookupError("wrong_dc", f"direction offer is for DC {offer.to}, not this one")
        me = offer.requester
        requester = keys.parse_node_id(me.node)
        if keys.parse_node_id(me.home_dc) != sender:  # a DC directs only towards its own nodes
            raise DirectionError("not_home", "the requester's info is not from its home DC")
        if me.pubkey is None or keys.node_id(bytes.fromhex(me.pubkey)) != requester:
            raise DirectionError("bad_pubkey", "the requester's public key is not the node's")
        if me.revoked or c.latest(requester)[1]:
            raise DirectionError("revoked", "the requester is revoked")
        peer = keys.parse_node_id(offer.peer)
        info = c.local_info(peer)
        if info is None:
            raise NodeLookupError("unknown_node", f"{offer.peer} is not registered at this DC")
        path = bytes.fromhex(offer.path)
        resume = bytes.fromhex(offer.resume) if offer.resume is not None else None
        route, role_a, grant_a, later = await self.direct_peer(path, me, info, offer.route, resume)
        self.counters["directions_offered"] += 1
        return messages.DirectionAnswer(offer.path, info, route.kind, route.reason, role_a, grant_a, later)  # type: ignore[arg-type]

    async def push(self, node: bytes, direction: messages.SignedEnvelope, path: bytes | None = None) -> None:
        """Push a Route Direction on `node`'s session. With `path` (the direction's), wait for the
        node's ack: DirectionError with its refusal, or peer_unresponsive without an answer."""
        session = self.c.presence.sessions.get(node)
        if session is None:
            raise DirectionError("offline", f"{keys.checksum(node)} has no session at this DC")
        if path is None:
            await session.send(messages.encode(messages.DirectionPush(direction)))
            self.counters["directions_delivered"] += 1
            return
        if len(self._acks) >= PENDING_ACKS_MAX:
            raise DirectionError("dc_busy", "too many directions in flight at this DC; retry in a second")
        key = (node, path)
        self._acks[key] = ack = asyncio.get_running_loop().create_future()
        try:
            await session.send(messages.encode(messages.DirectionPush(direction)))
            self.counters["directions_delivered"] += 1
            refused = await asyncio.wait_for(ack, DIRECTION_ACK_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.counters["directions_unacknowledged"] += 1
            raise DirectionError(
                "peer_unresponsive",
                f"{keys.checksum(node)} did not acknowledge the direction "
                f"within {DIRECTION_ACK_TIMEOUT_S:g} s (its session may be dead)",
            ) from None
        finally:
            self._acks.pop(key, None)
        if refused is not None:
            self.counters["directions_refused_by_peer"] += 1
            raise DirectionError(refused, PEER_REFUSALS[refused].format(peer=keys.checksum(node)))

    def on_ack(self, node: bytes, ack: messages.DirectionAck) -> None:
        """`node`'s answer to a push (from its own session, so it answers only its own pushes);
        an answer nobody waits for is ignored."""
        waiting = self._acks.get((node, bytes.fromhex(ack.path)))
        if waiting is not None and not waiting.done():
            waiting.set_result(ack.refused)

    async def deliver_to(self, home: bytes, node: bytes, direction: messages.SignedEnvelope, path: bytes) -> None:
        """Hand Route Direction `path` to `node`: directly if its home is here, else via its home DC;
        either way once the node acknowledged it (its refusal comes back as a DirectionError)."""
        if home == self.c.address:
            await self.push(node, direction, path)
            return
        dc = self.c.cache.dcs[home]
        try:
            await self.c.federation.deliver_direction(dc.endpoint, home, direction)
        except FederationError as exc:
            raise DirectionError(exc.code or "home_dc_unreachable", str(exc)) from None

    async def accept_delivery(self, obj: dict) -> dict:
        """A peer DC hands us a Route Direction for one of our nodes: verify, push it, and answer
        once the node acknowledged it (its refusal as the error)."""
        env, body = envelope.open_body(
            obj,
            messages.ROUTE_DIRECTION,
            messages.RouteDirection,
            self.c.clock.wall_ms(),
            self.c.cache.is_active_dc,
            self.c.guard,
        )
        if keys.parse_node_id(body.home_dc) != self.c.address:
            raise NodeLookupError("wrong_dc", f"route direction is for DC {body.home_dc}, not this one")
        await self.push(keys.parse_node_id(body.node), envelope.signed(obj), bytes.fromhex(body.path))
        return {"delivered": True}

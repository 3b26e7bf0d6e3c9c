"""Direction Requests: a node asks its DC for a route to a peer; the DC directs both ends.

The requester's DC gets the peer's key and addresses (locally or by an NTM Information Request
to the peer's home DC), decides the route (ntm/route.py), books a relay path as fallback, and sends
a signed Route Direction to each node: the peer's through the peer's home DC, first, so the peer
is listening before the requester starts. docs/PROTOCOL.md §8.
"""

from __future__ import annotations

import asyncio
import logging
import os

from dc.federation import FederationError, now_ms
from ntm import envelope, keys
from ntm.errors import NtmError
from ntm.route import Reach, Route, decide, family

log = logging.getLogger("ntm.dc.signaling")

ROUTE_DIRECTION = "route-direction"
RELAY_DIRECTION = "relay-direction"
PATH_ID_LEN = 8
RELAY_TOKEN_LEN = 32
# A relayed path lives at most an hour and carries at most 1 GiB; the nodes ask again after that.
RELAY_LIFETIME_MS = 3600 * 1000
RELAY_MAX_BYTES = 1 << 30


class DirectionError(NtmError):
    """A Direction Request that cannot be served; `code`: unknown_node, revoked, offline, ..."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def reach_of(info: dict) -> Reach:
    return Reach(tuple(info.get("local_addrs") or ()), info.get("observed"), info.get("observed_alt"))


ROLES = {  # route kind and initiator → (requester's role, peer's role)
    ("direct", "a"): ("initiate", "wait"),
    ("nat_initiates", "a"): ("initiate", "wait"),
    ("nat_initiates", "b"): ("wait", "initiate"),
    ("punch", "both"): ("punch", "punch"),
    ("relay", None): ("initiate", "wait"),
}


class Signaling:
    def __init__(self, coordinator) -> None:
        self.c = coordinator
        self.counters = {"directions_served": 0, "directions_failed": 0, "directions_delivered": 0}

    async def peer_info(self, peer: bytes) -> tuple[dict, bytes]:
        """The peer's verified info and its home DC; DirectionError if it cannot be reached."""
        c = self.c
        onchain = await c.cache.resolve(peer)
        stored = c.store.node(peer)
        if stored and (onchain is None or stored.timestamp >= onchain.timestamp):
            info, home = c.local_info(peer), c.address
        elif onchain is None:
            raise DirectionError("unknown_node", f"{keys.checksum(peer)} is not registered")
        elif onchain.revoked:
            raise DirectionError("revoked", f"{keys.checksum(peer)} is revoked")
        else:
            dc = c.cache.dcs.get(onchain.dc)
            if dc is None or not dc.active:
                raise DirectionError("home_dc_inactive", f"home DC {keys.checksum(onchain.dc)} is not active")
            try:
                info = await c.federation.ntm_info(dc.endpoint, onchain.dc, peer)
            except FederationError as exc:
                raise DirectionError("home_dc_unreachable", str(exc)) from None
            home = onchain.dc
        if info.get("revoked"):
            raise DirectionError("revoked", f"{keys.checksum(peer)} is revoked")
        if not info.get("online"):
            raise DirectionError("offline", f"{keys.checksum(peer)} is offline (no session at its DC)")
        if keys.node_id(bytes.fromhex(info["pubkey"])) != peer:
            raise DirectionError("bad_pubkey", "the peer's home DC returned a key that is not the peer's")
        return info, home

    async def book_relay(self, path: bytes, nodes: list[bytes]) -> tuple[bytes, list[str]] | None:
        """Book a relay path at the first relay that accepts; (token, relay UDP endpoints) or None."""
        token = os.urandom(RELAY_TOKEN_LEN)
        body = {"path": path.hex(), "token": token.hex(), "nodes": [keys.checksum(n) for n in nodes],
                "expires_ms": now_ms() + RELAY_LIFETIME_MS, "max_bytes": RELAY_MAX_BYTES}
        for url in self.c.relays:
            env = envelope.seal(self.c.key, RELAY_DIRECTION, body, now_ms())
            try:
                answer = await self.c.federation.post(f"{url.rstrip('/')}/v1/relay-directions", env, f"relay {url}")
            except FederationError as exc:
                log.warning("relay %s refused path: %s", url, exc)
                continue
            return token, list(answer.get("relay") or [])
        return None

    def direction(self, path: bytes, route: Route, role: str, me: bytes, peer: bytes, peer_pub: str,
                  candidates: list[str], relay, side: int, my_reach: Reach, requester: bytes,
                  resume: bytes | None = None) -> dict:
        body = {"path": path.hex(), "kind": route.kind, "reason": route.reason, "role": role,
                "node": keys.checksum(me), "peer": keys.checksum(peer), "peer_pubkey": peer_pub,
                "requester": keys.checksum(requester),
                "candidates": [] if route.kind == "relay" else candidates, "relay": None}
        if resume is not None:
            body["resume"] = resume.hex()
        if relay is not None:
            token, endpoints = relay
            fams = my_reach.families()
            usable = [e for e in endpoints if family(e) in fams] or endpoints
            body["relay"] = {"endpoints": usable, "token": token.hex(), "side": side}
        return envelope.seal(self.c.key, ROUTE_DIRECTION, body, now_ms())

    async def request(self, requester: bytes, peer: bytes, force_relay: bool = False,
                      resume: bytes | None = None) -> dict:
        """Serve a Direction Request from `requester` (who holds a session here). `force_relay`:
        the node asks for the relay (e.g. it knows its network blocks direct UDP). `resume`: the
        path ID of a tunnel between the two that stopped working; both directions carry it so
        both nodes move that tunnel onto the new path (§8.3)."""
        c = self.c
        try:
            if peer == requester:
                raise DirectionError("self", "a node cannot open a tunnel to itself")
            me = c.local_info(requester)
            path = os.urandom(PATH_ID_LEN)
            (info, home), relay = await asyncio.gather(self.peer_info(peer), self.book_relay(path, [requester, peer]))
            ra, rb = reach_of(me), reach_of(info)
            route = Route("relay", None, "relay requested by the node") if force_relay else decide(ra, rb)
            if route.kind == "relay" and relay is None:
                raise DirectionError("no_relay", f"route needs a relay ({route.reason}) and none is available")
            role_a, role_b = ROLES[(route.kind, route.initiator)]
            dir_b = self.direction(path, route, role_b, peer, requester, me["pubkey"], ra.candidates(rb), relay, 1, rb,
                                   requester, resume)
            dir_a = self.direction(path, route, role_a, requester, peer, info["pubkey"], rb.candidates(ra), relay, 0, ra,
                                   requester, resume)
            if role_b == "initiate":  # the peer starts the handshake: the requester listens first
                await self.push(requester, dir_a)
                await self.deliver_to(home, peer, dir_b)
            else:  # the requester starts (or both punch): the peer listens first
                await self.deliver_to(home, peer, dir_b)
                await self.push(requester, dir_a)
        except DirectionError:
            self.counters["directions_failed"] += 1
            raise
        self.counters["directions_served"] += 1
        log.info("route %s → %s: %s (%s), path %s", keys.checksum(requester), keys.checksum(peer),
                 route.kind, route.reason, path.hex())
        return {"path": path.hex(), "kind": route.kind, "reason": route.reason, "role": role_a}

    async def push(self, node: bytes, direction: dict) -> None:
        session = self.c.presence.sessions.get(node)
        if session is None:
            raise DirectionError("offline", f"{keys.checksum(node)} has no session at this DC")
        await session.send({"type": "direction", "direction": direction})
        self.counters["directions_delivered"] += 1

    async def deliver_to(self, home: bytes, node: bytes, direction: dict) -> None:
        """Hand a Route Direction to `node`: directly if its home is here, else via its home DC."""
        if home == self.c.address:
            await self.push(node, direction)
            return
        dc = self.c.cache.dcs[home]
        try:
            await self.c.federation.post(f"{dc.endpoint.rstrip('/')}/v1/federation/route-direction", direction,
                                         f"home DC {keys.checksum(home)}")
        except FederationError as exc:
            raise DirectionError(exc.code or "home_dc_unreachable", str(exc)) from None

    async def accept_delivery(self, obj: dict) -> dict:
        """A peer DC hands us a Route Direction for one of our nodes: verify, then push it."""
        env = envelope.open_envelope(obj, ROUTE_DIRECTION, now_ms(), self.c.cache.is_active_dc, self.c.guard)
        node = keys.parse_node_id(str(env.body.get("node")))
        await self.push(node, obj)
        return {"delivered": True}

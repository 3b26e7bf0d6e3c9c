"""The node's tunnel table: follow Route Directions, hand tunnels to connect()/accept(), keep
them alive (probe, re-direct), and remember the ones that ended (§8.1, §8.3).

A tunnel is a `Link` whose send/recv survive path changes: while it carries traffic and nothing
authenticated comes back, it is probed (a PING from wherever we are now lets the peer roam to
us); if that fails, the node asks the DCs for a new direction to the same peer ("resume": the
tunnel's ID) and both ends move the Link onto the new path. What to do when is decided by
node/liveness.py; this module does it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from daemon.service import BackgroundTasks, LogLimiter
from node import liveness
from node.channel import Channel, Link
from node.dc_session import NodeError
from node.endpoint import Endpoint
from ntm import envelope, keys, messages
from ntm.addr import parse_endpoint
from ntm.clock import Clock
from ntm.errors import NtmError, ParseError, SignatureError
from ntm.ratelimit import FairShare
from ntm.tunnel import RelayInfo

log = logging.getLogger("ntm.node")

# How long the tunnel handshake may take once directed: direct attempts, then the relay from
# 1.5 s on (node/endpoint.py), with room for a few relay retries.
TUNNEL_TIMEOUT_S = 8.0
# Ended tunnels kept for `ntm status`: enough to see what just happened, bounded for a long run.
ENDED_TUNNELS_KEPT = 16
# Tunnel liveness, checked this often for every Link.
LIVENESS_TICK_S = 0.05
# A re-direction that failed (peer also moving, DC session reconnecting) is retried (soon, or
# backing off after refusals: liveness.repair_retry_delay) for at most this long.
RECOVERY_GIVE_UP_S = 60.0

# Asks the DCs for a path to a peer: (peer, route wish None/"relay"/"direct", resume) → our signed
# Route Direction, once the peer has its own (DcSession.direction: the request's one reply).
AskDirection = Callable[[bytes, "str | None", "bytes | None"], Awaitable[messages.SignedEnvelope]]
# Directions a node serves for tunnels peers ask for (the peer's DC may be told to send many):
# per peer a burst of 8 then one per 2 s (a few tunnels and their repairs), and 64 then 16/s in
# all, shared fairly. Beyond that a direction is refused (peer_busy) before any handshake
# (counted in `refused`).
PEER_DIRECTIONS = (0.5, 8.0)
ALL_DIRECTIONS = (16.0, 64.0)
# The 64-then-16/s is shared fairly (ratelimit.FairShare): each peer that asked within the last
# 16 s (a per-peer bucket's refill time) gets at most its share of it, and always a burst of one,
# so a crowd of identities flooding a node cannot starve a peer that asks once. The hard ceiling
# over all peers (CPU) is twice that, never reached by the crowd's shares alone.
DIRECTIONS_ACTIVE_S = 16.0
DIRECTIONS_CAP = (32.0, 128.0)
# Peers whose direction rate is remembered (least recently seen forgotten first).
RATE_PEERS_KEPT = 4096
# Inbound policy: may this peer open a tunnel to us? (The daemon's allow list; default: anyone.)
Admit = Callable[[bytes], bool]
# May DC `signer` direct us, in a direction delivered by DC `home_dc`, for our own request (True)
# or for a peer's (False)? (DcSession.may_direct, §8.1.)
TrustDc = Callable[[bytes, bytes, bool], Awaitable[bool]]


async def trust_no_dc(signer: bytes, home_dc: bytes, ours: bool) -> bool:
    """Until told which DCs are ours, no direction is followed."""
    return False


@dataclass
class Tunnel:
    """A tunnel to `peer`: its Link (`channel`), how it was made, and how it was repaired.

    `id` is the first path ID; both ends know it, and a re-direction names it to move the tunnel.
    """

    peer: bytes
    channel: Link
    kind: str
    role: str
    opened_at: float
    id: bytes = b""
    redirects: int = 0  # new paths the DCs gave this tunnel after the old one died
    probes: int = 0  # liveness PINGs sent while the path was silent
    reason: str = ""  # the DC's reason for the route (why relayed, why punched)
    pinned_relay: bool = False  # the application asked for the relay: never moved off it
    direct_tried_at: float = 0.0  # last attempt to move off the relay (monotonic)
    direct_attempts: int = 0
    in_use: bool = True  # used within liveness.ACTIVE_WINDOW_S at the last tick (a new one just was)
    resumed_at: float = 0.0  # when it was last used again after an idle spell (monotonic)
    recovering: asyncio.Task | None = field(default=None, repr=False)
    upgrading: asyncio.Task | None = field(default=None, repr=False)
    # How a silent tunnel gets a new path when no DC directs it (the relay's exit, node/exit_relay.py)
    repair: Callable[["Tunnel"], Awaitable[None]] | None = field(default=None, repr=False)

    def status(self, state: str) -> dict:
        ch = self.channel
        return {
            "peer": keys.checksum(self.peer),
            "id": self.id.hex(),
            "path": ch.path_id.hex(),
            "state": state,
            "route": self.kind,
            "via": ch.via,
            "redirects": self.redirects,
            "direct_attempts": self.direct_attempts,
            "rtt_ms": round(ch.rtt * 1000, 2) if ch.rtt else None,
            **ch.stats,
        }


def open_direction(obj: Any, now_ms: int) -> tuple[envelope.Envelope, messages.RouteDirection]:
    """A Route Direction envelope, signed by its `from` and fresh, and its body; ParseError if
    malformed, SignatureError if forged or stale. Whether its signer may direct us is the
    caller's check (Tunnels._directed_by_dc): anyone can sign an envelope with some key."""
    return envelope.open_body(obj, messages.ROUTE_DIRECTION, messages.RouteDirection, now_ms, lambda dc: True)


class Tunnels:
    def __init__(
        self,
        my_id: bytes,
        endpoint: Endpoint,
        clock: Clock,
        ask: AskDirection,
        check_address: Callable[[], Awaitable[bool]],
        admit: Admit = lambda peer: True,
        udp_ok: Callable[[], bool] = lambda: True,
        trust_dc: TrustDc = trust_no_dc,
    ) -> None:
        self.my_id = my_id
        self.trust_dc = trust_dc
        self.forged_directions = 0  # directions not from our DCs, not for us, or replayed: ignored
        self._forgeries = LogLimiter(log, "route directions", 10.0, clock)
        self._guard = envelope.ReplayGuard()
        self.admit = admit
        self.udp_ok = udp_ok  # False: our network lets no UDP out, reach relays over TCP (§8.4)
        self.refused = 0  # directions from peers the policy does not admit, or beyond the rates
        self._rate = FairShare(PEER_DIRECTIONS, ALL_DIRECTIONS, DIRECTIONS_CAP, DIRECTIONS_ACTIVE_S, RATE_PEERS_KEPT)
        self._refusals = LogLimiter(log, "tunnels from peers", 10.0, clock)
        self.endpoint = endpoint
        self.clock = clock
        self.ask = ask
        self.check_address = check_address
        self.table: dict[bytes, Tunnel] = {}  # by tunnel ID
        self.ended: deque[dict] = deque(maxlen=ENDED_TUNNELS_KEPT)  # for status output
        self._incoming: asyncio.Queue[Tunnel] = asyncio.Queue()
        self.tasks = BackgroundTasks()

    def start(self) -> None:
        self.tasks.spawn(self._liveness_loop())

    async def close(self) -> None:
        await self.tasks.cancel()

    # --- opening ------------------------------------------------------------------------------
    async def _opened(
        self, obj: messages.SignedEnvelope
    ) -> tuple[envelope.Envelope, messages.RouteDirection, bool] | None:
        """A Route Direction that names us, is signed by a DC that may direct us and was not seen
        before (§8.1), and whether it answers our own request; None (counted) for anything else.
        Decided before anything is sent, so an injected direction sends nothing."""
        try:
            env, d = open_direction(obj, self.clock.wall_ms())
            ours = keys.parse_node_id(d.requester) == self.my_id
            if keys.parse_node_id(d.node) != self.my_id:
                why = "for another node"
            elif not await self.trust_dc(env.sender, keys.parse_node_id(d.home_dc), ours):
                why = "not signed by a DC that may direct us"
            else:
                self._guard.check_and_add(env, self.clock.wall_ms())
                return env, d, ours
        except SignatureError as exc:
            why = f"forged or replayed ({exc})"
        except (ParseError, ValueError) as exc:
            why = f"malformed ({exc})"
        self.forged_directions += 1
        self._forgeries.note(why)
        return None

    async def on_direction(self, obj: messages.SignedEnvelope) -> messages.DirectionAck | None:
        """A Route Direction pushed by the DC for a peer's request: check at once who directs us
        (§8.1) and whether we serve it (the DC waits for this answer to tell the requester), and
        open its path in the background. None (no answer) for a direction that is malformed,
        forged, replayed, or our own (ours come in the reply to our request, never pushed)."""
        opened = await self._opened(obj)
        if opened is None:
            return None
        _, d, ours = opened
        if ours:
            self.forged_directions += 1
            self._forgeries.note("our own, pushed (ours answer our request)")
            return None
        refused = self._refusal(keys.parse_node_id(d.peer))
        if refused is None:
            self.tasks.spawn(self.follow(d))
        return messages.DirectionAck(d.path, refused)

    async def follow(self, d: messages.RouteDirection) -> None:
        """Open the tunnel a peer's Route Direction describes; hand it to accept() or (with
        "resume") to the existing tunnel it repairs."""
        resume = bytes.fromhex(d.resume) if d.resume else None
        if resume is not None and await self._rebound(resume, keys.parse_node_id(d.peer)):
            return
        try:
            tunnel = await self._open(d)
        except NodeError:
            return  # logged by _open
        if tunnel.id == bytes.fromhex(d.path):
            self._incoming.put_nowait(tunnel)

    async def _open(self, d: messages.RouteDirection) -> Tunnel:
        """Open the path a Route Direction describes: a new tunnel, or attached to the one it resumes;
        NodeError if it is malformed or no handshake completes."""
        try:
            path, peer = bytes.fromhex(d.path), keys.parse_node_id(d.peer)
            relay, streams = None, []
            if d.relay is not None:
                relay = RelayInfo(parse_endpoint(d.relay.endpoints[0]), bytes.fromhex(d.relay.token), d.relay.side)
                if not self.udp_ok():
                    streams = d.relay.streams
            candidates = [parse_endpoint(c) for c in d.candidates]
            unverified = [parse_endpoint(c) for c in d.unverified]
            resume = bytes.fromhex(d.resume) if d.resume else None
        except ValueError as exc:
            log.warning("ignoring malformed route direction: %s", exc)
            raise NodeError("malformed", f"malformed route direction: {exc}") from None
        try:
            ch = await self.endpoint.open(
                path,
                peer,
                bytes.fromhex(d.peer_pubkey),
                candidates,
                d.role,
                relay,
                TUNNEL_TIMEOUT_S,
                unverified=unverified,
                relay_stream=streams,
            )
        except NtmError as exc:  # includes PeerIdentityError: the key is not the peer's
            log.warning("tunnel to %s failed: %s", keys.checksum(peer), exc)
            raise NodeError("tunnel_failed", f"tunnel to {keys.checksum(peer)} failed: {exc}") from None
        return self._place(ch, d, path, peer, resume)

    def _refusal(self, peer: bytes) -> messages.Refusal | None:
        """Why we do not serve a direction a peer asked for (None: we do): not on the allow list,
        or beyond the rates. Decided before any handshake or session exists, so a refused peer
        costs nothing more than the answer to our DC."""
        now = self.clock.now()
        if not self.admit(peer):
            code, why = "not_allowed", "not on the allow list"
        elif not self._rate.take(peer, now):
            code, why = "peer_busy", "too many directions"
        else:
            return None
        self.refused += 1
        self._refusals.note(why)
        return code

    def _place(self, ch: Channel, d: messages.RouteDirection, path: bytes, peer: bytes, resume: bytes | None) -> Tunnel:
        """Attach a new path to the tunnel it resumes, or make it a new tunnel."""
        old = self.table.get(resume) if resume is not None else None
        if old is not None and old.peer == peer and not old.channel.closed:
            old.channel.attach(ch)
            old.kind, old.role, old.reason = d.kind, d.role, d.reason
            old.redirects += 1
            log.info(
                "tunnel %s to %s moved to path %s: %s via %s",
                old.id.hex(),
                keys.checksum(peer),
                path.hex(),
                d.kind,
                ch.via,
            )
            return old
        tunnel = Tunnel(
            peer,
            Link(ch, self.clock),
            d.kind,
            d.role,
            self.clock.wall(),
            id=path,
            reason=d.reason,
            direct_tried_at=self.clock.now(),
        )
        self.table[path] = tunnel
        log.info("tunnel to %s up: %s via %s", keys.checksum(peer), d.kind, ch.via)
        return tunnel

    async def _directed(self, peer: bytes, route: str | None, resume: bytes | None) -> Tunnel:
        """Ask for a direction to `peer` and open the path it describes: the DC's one reply carries
        our Route Direction, checked as a pushed one is (§8.1) and that it answers this request."""
        opened = await self._opened(await self.ask(peer, route, resume))
        if opened is None or not opened[2] or keys.parse_node_id(opened[1].peer) != peer:
            raise NodeError(
                "forged_direction", f"the DC's answer for {keys.checksum(peer)} is not a direction to follow"
            )
        return await self._open(opened[1])

    async def connect(self, peer: bytes, force_relay: bool = False, fresh: bool = False) -> Tunnel:
        """The working tunnel to `peer` if there is one (reused: no new path), else ask the DC for
        a route and build one; NodeError with the reason if not. `force_relay`: a tunnel pinned to
        the relay (only such a one is reused); `fresh`: always a new path (measurements)."""
        t = None if fresh else self.working(peer, force_relay)
        if t is not None:
            return t
        t = await self._directed(peer, "relay" if force_relay else None, None)
        t.pinned_relay = force_relay
        return t

    def adopt(self, t: Tunnel) -> None:
        """A tunnel opened without a Route Direction (`t.repair` gives it new paths): watched,
        probed and shown like the others."""
        self.table[t.id] = t

    def working(self, peer: bytes, pinned_relay: bool) -> Tunnel | None:
        """The newest tunnel to `peer` (opened by either end) whose path works: handshake done,
        not closed, not being repaired; pinned to the relay exactly when `pinned_relay`."""
        for t in reversed(self.table.values()):
            link = t.channel
            if (
                t.peer == peer
                and t.pinned_relay == pinned_relay
                and not link.closed
                and not link.current.closed
                and link.established
                and t.recovering is None
            ):
                return t
        return None

    async def accept(self) -> Tunnel:
        """The next tunnel a peer opened to us."""
        return await self._incoming.get()

    # --- liveness and repair ------------------------------------------------------------------
    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(LIVENESS_TICK_S)
            now = self.clock.now()
            for t in list(self.table.values()):
                self._check(t, now)

    def _check(self, t: Tunnel, now: float) -> None:
        link = t.channel
        if link.current.closed_by_peer and not link.closed:
            log.info("tunnel %s closed by %s", t.id.hex(), keys.checksum(t.peer))
            link.peer_closed()
        if link.closed:
            if self.table.pop(t.id, None) is not None:
                self.ended.append(t.status("closed"))
            return
        for ch in list(link.channels):
            if ch is not link.current and liveness.old_path_expired(now, ch.last_heard):
                link.detach(ch)
                self.tasks.spawn(ch.close())
        in_use = liveness.in_use(now, link.last_app)
        if in_use and not t.in_use:
            t.resumed_at = now  # used again after an idle spell: silence counts from here
        t.in_use = in_use
        heard = liveness.silent_since(link.last_heard, t.resumed_at)
        action = liveness.link_action(now, link.last_app, heard, t.recovering is not None)
        if action is liveness.LinkAction.REDIRECT:
            t.recovering = self.tasks.spawn(t.repair(t) if t.repair is not None else self._redirect(t))
        elif action is liveness.LinkAction.PROBE:
            self.probe(t)
        elif liveness.direct_retry_due(
            now,
            t.direct_tried_at,
            link.via == "relay" and not t.pinned_relay,
            t.recovering is not None or t.upgrading is not None,
        ):
            t.direct_tried_at = now
            t.upgrading = self.tasks.spawn(self._try_direct(t))

    def probe(self, t: Tunnel) -> None:
        """A PING from our current address: the answer proves the path; the PING itself moves the
        peer to our new address if we roamed (authenticated-address update)."""
        ch = t.channel.current
        if ch.established and not ch.closed:
            t.probes += 1
            self.tasks.spawn(self._ping_quietly(ch))

    def probe_all(self) -> None:
        """We moved: probe every tunnel, and let the relayed ones try a direct path again."""
        for t in self.table.values():
            self.probe(t)
            t.direct_tried_at = float("-inf")

    async def _rebound(self, tunnel_id: bytes, peer: bytes) -> bool:
        """The peer asks to repair a tunnel we have: it stopped hearing us. PING it at once from
        where we are (it roams to us on that PING if it can hear us: a public peer, the relay),
        and check our public address. If our NAT mapping changed (rebound while idle), the
        direction the peer got names our old mapping: we ask for our own instead (the DC has
        just seen the new one) and do not follow the peer's. True in that case."""
        t = self.table.get(tunnel_id)
        if t is None or t.peer != peer or t.channel.closed:
            return False
        self.probe(t)
        if not await self.check_address():
            return False
        log.info("tunnel %s to %s: our public address changed; re-directing from here", t.id.hex(), keys.checksum(peer))
        if t.recovering is None:
            t.recovering = self.tasks.spawn(self._redirect(t, address_checked=True))
        return True

    async def _try_direct(self, t: Tunnel) -> None:
        """Ask for a direct path for a tunnel on the relay; if its handshake completes, follow()
        moves the tunnel onto it (both ends); if not, the tunnel stays on the relay as it was."""
        t.direct_attempts += 1
        try:
            await self._directed(t.peer, "direct", t.id)
            log.info("tunnel %s to %s moved off the relay", t.id.hex(), keys.checksum(t.peer))
        except (NodeError, asyncio.TimeoutError) as exc:
            log.info("tunnel %s to %s stays on the relay: %s", t.id.hex(), keys.checksum(t.peer), exc)
        finally:
            t.upgrading = None

    @staticmethod
    async def _ping_quietly(ch: Channel) -> None:
        try:
            await ch.ping(liveness.DEAD_AFTER_S)
        except (asyncio.TimeoutError, NtmError):
            pass

    async def _redirect(self, t: Tunnel, address_checked: bool = False) -> None:
        """Ask the DCs for a new path to the same peer, naming the tunnel, until one works.
        The resulting direction is attached to the Link in follow() (on both ends)."""
        started, redirects, refusals = self.clock.now(), t.redirects, 0
        log.info("tunnel %s to %s silent: asking for a new direction", t.id.hex(), keys.checksum(t.peer))
        try:
            if not address_checked:
                await self.check_address()  # if we moved: new session, and the DC learns our new mapping
            while not t.channel.closed and self.clock.now() - started < RECOVERY_GIVE_UP_S:
                if liveness.recovered(self.clock.now(), t.channel.last_heard) or t.redirects > redirects:
                    return  # the old path came back, or the peer's direction moved the tunnel meanwhile
                try:
                    await self._directed(t.peer, None, t.id)
                    return
                except (NodeError, asyncio.TimeoutError) as exc:
                    code = exc.code if isinstance(exc, NodeError) else "timeout"
                    refusals = liveness.repair_refusals(code, refusals)
                    delay = liveness.repair_retry_delay(refusals)
                    log.info("re-direction for tunnel %s failed (next in %g s): %s", t.id.hex(), delay, exc)
                    await asyncio.sleep(delay)
        finally:
            t.recovering = None

    def status(self) -> list[dict]:
        return [
            {**t.status("open"), "transport": self.endpoint.transport(t.channel.current.session)}
            for t in self.table.values()
        ] + list(self.ended)

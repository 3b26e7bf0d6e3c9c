"""`ntm up --exit-relay`: this node's traffic to ordinary servers leaves through a relay's exit
(docs/PROTOCOL.md §10.13), so a server sees the relay's one address while this node moves.

The node asks its DC to book the exit (the DC asks its relays; a relay admits only the nodes its
operator allows), checks what it is given (the exit's key is its node ID's, its exit offer is
signed by that key) and opens an ordinary tunnel to the exit as initiator. The exit is then used
like an exit node's (§10.10): its default routes go to routing table 4330, for the user's `ip rule`s.
The tunnel table watches the tunnel like any other; when it falls silent in use (this node moved
where the exit's old address does not reach) it is repaired here, with a new booking and path.

    relay = ExitRelay(node, plane, routes, lambda: node.session.dc.book_exit(node.key, node.session.clock.wall_ms()))
    await relay.start()          # ExitRelayError (the DC's or relay's refusal) if not booked
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from node import liveness
from node.agent import Node
from node.channel import Channel, Link
from node.dataplane import DataPlane
from node.dc_client import DcError
from node.subnet import RouteSync
from node.tunnels import TUNNEL_TIMEOUT_S, Tunnel
from ntm import keys, messages
from ntm.addr import parse_endpoint
from ntm.errors import CodedError, NtmError
from ntm.routes import RouteError, verify_offer

log = logging.getLogger("ntm.node")

#: Give a repair up after this long (the tunnel stays; the next silence in use tries again).
REPAIR_GIVE_UP_S = 60.0

Book = Callable[[], Awaitable[messages.ExitGrant]]


class ExitRelayError(CodedError):
    """No exit: the DC or the relay refused (their code), or the grant does not verify."""


class ExitRelay:
    def __init__(self, node: Node, plane: DataPlane, routes: RouteSync, book: Book) -> None:
        self.node, self.plane, self.routes, self.book = node, plane, routes, book
        self.exit_id: bytes | None = None
        self.tunnel: Tunnel | None = None

    async def _open(self) -> Channel:
        """Book the exit and open a tunnel to it; ExitRelayError if refused or not verifiable."""
        try:
            grant = await self.book()
        except DcError as exc:
            raise ExitRelayError(exc.code, f"no exit at a relay: {exc}") from None
        try:
            exit_id, pub = keys.parse_node_id(grant.exit_node), bytes.fromhex(grant.exit_pubkey)
            offer = verify_offer(grant.offer)
            if keys.node_id(pub) != exit_id or offer.node != exit_id or not offer.exit:
                raise RouteError("the exit's key, node ID and exit offer do not match")
            if self.exit_id is not None and exit_id != self.exit_id:
                raise RouteError("another exit than the one in use (the relay restarted?)")
            candidates = [parse_endpoint(e) for e in grant.exit]
        except (ValueError, NtmError) as exc:
            raise ExitRelayError("bad_grant", f"the exit's grant does not verify: {exc}") from None
        self.exit_id = exit_id
        if self.routes.table.learn(offer):
            self.routes.sync_kernel()
        ch = await self.node.endpoint.open(
            bytes.fromhex(grant.path), exit_id, pub, candidates, "initiate", timeout=TUNNEL_TIMEOUT_S
        )
        log.info(
            "exit %s: path %s via %s (caps: %d B/s, %d flows, %d bytes)",
            keys.checksum(exit_id),
            grant.path,
            ch.via,
            grant.rate_bps,
            grant.max_flows,
            grant.max_bytes,
        )
        return ch

    async def start(self) -> None:
        """Book, open, route 0.0.0.0/0 and ::/0 (table 4330) into the tunnel; ExitRelayError if not."""
        try:
            ch = await self._open()
        except NtmError as exc:  # the handshake did not complete
            if isinstance(exc, ExitRelayError):
                raise
            raise ExitRelayError("tunnel_failed", f"no tunnel to the relay's exit: {exc}") from None
        clock = self.node.session.clock
        t = Tunnel(
            ch.peer_id,
            Link(ch, clock),
            "exit",
            "initiate",
            clock.wall(),
            id=ch.path_id,
            reason="the relay's exit (--exit-relay)",
            repair=self.repair,
        )
        table = self.routes.table
        table.choose(dict(table.wanted), ch.peer_id)
        self.routes.sync_kernel()
        self.node.tunnel_table.adopt(t)
        self.plane.attach(t)
        self.tunnel = t

    async def repair(self, t: Tunnel) -> None:
        """The exit's path fell silent in use: book a new path (from where we are now) and move
        the tunnel onto it, until one works, the old path answers again, or REPAIR_GIVE_UP_S."""
        clock = self.node.session.clock
        started = clock.now()
        log.info("exit tunnel %s silent: booking a new path", t.id.hex())
        try:
            while not t.channel.closed and clock.now() - started < REPAIR_GIVE_UP_S:
                if liveness.recovered(clock.now(), t.channel.last_heard):
                    return
                try:
                    t.channel.attach(await self._open())
                    t.redirects += 1
                    return
                except (NtmError, asyncio.TimeoutError) as exc:
                    log.info("exit repair failed (next in %g s): %s", liveness.REPAIR_RETRY_S, exc)
                    await asyncio.sleep(liveness.REPAIR_RETRY_S)
        finally:
            t.recovering = None

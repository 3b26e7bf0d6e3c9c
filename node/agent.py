"""The running node: a session with its DC, keepalives from the tunnel socket, and tunnels.

    node = await Node.start(key, "http://dc1:8330")
    t = await node.connect(peer_id)            # Direction Request → Route Direction → handshake
                                               # (or the tunnel to peer_id that already works)
    await t.channel.send(b"hi"); print(await t.channel.recv())
    incoming = await node.accept()             # a tunnel some peer opened to us

The daemon (`ntm up`, node/daemon.py) uses it; applications that embed a node use node/api.py
(AppNode: datagrams and streams) on top of it. It wires three parts together: the tunnel endpoint (node/endpoint.py, one UDP socket), the
DC session (node/dc_session.py) and the tunnel table (node/tunnels.py); the repair decisions are
pure functions in node/liveness.py. docs/PROTOCOL.md §8.3 says how a node stays reachable while
networks change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import coincurve

from node.channel import forward
from node.dc_session import DcSession, NodeError, local_addrs_towards
from node.cs_client import Received
from node.endpoint import DEFAULT_PORT, Binder, Endpoint, UdpBind
from node.mailbox import Mailbox
from node.tunnels import Admit, Tunnel, Tunnels
from ntm import keepalive, keys
from ntm.addr import format_endpoint
from ntm.clock import SYSTEM, Clock
from ntm.messages import DirectionAck, RouteOffer
from ntm.tunnel import TunnelConfig

# Keepalive period to the DC and of idle tunnels: below the common 30 s NAT UDP timeout.
# Configurable per node (Node.start): a network with shorter NAT timeouts needs a shorter one.
KEEPALIVE_INTERVAL_S = keepalive.KEEPALIVE_INTERVAL_S

__all__ = ["Node", "NodeError", "Tunnel", "local_addrs_towards"]


class Node:
    def __init__(
        self,
        key: coincurve.PrivateKey,
        dc_url: str,
        endpoint: Endpoint,
        clock: Clock = SYSTEM,
        keepalive_interval: float = KEEPALIVE_INTERVAL_S,
        local_addrs: list[str] | None = None,
        admit: Admit = lambda peer: True,
        inbox: Path | None = None,
        take_item: Callable[[Received], bool] = lambda item: False,
        dc_pin: bytes | None = None,
    ) -> None:
        self.key = key
        self.id = keys.node_id_of(key)
        self.endpoint = endpoint
        self.session = DcSession(
            key,
            dc_url,
            endpoint,
            clock,
            keepalive_interval,
            local_addrs,
            on_direction=self._on_direction,
            on_moved=self._on_moved,
            on_notice=self._on_notice,
            dc_pin=dc_pin,
        )
        # Cache Server items: fetched into `inbox` on the DC's notice (and at start), if given
        self.mailbox = (
            Mailbox(key, inbox, self.session.ack_notice, take_item, lambda: self.session.dc_url, clock, admit)
            if inbox is not None
            else None
        )
        self.tunnel_table = Tunnels(
            self.id,
            endpoint,
            clock,
            self.session.direction,
            self.session.check_address,
            admit,
            udp_ok=lambda: self.session.udp is not False,
            trust_dc=self.session.may_direct,
        )

    @classmethod
    async def start(
        cls,
        key: coincurve.PrivateKey,
        dc_url: str,
        host: str | None = None,
        port: int = DEFAULT_PORT,
        local_addrs: list[str] | None = None,
        keepalive_interval: float = KEEPALIVE_INTERVAL_S,
        clock: Clock = SYSTEM,
        binder: Binder = UdpBind.open,
        last_timestamp: int = 0,
        admit: Admit = lambda peer: True,
        inbox: Path | None = None,
        take_item: Callable[[Received], bool] = lambda item: False,
        dc_pin: bytes | None = None,
        route_offer: RouteOffer | None = None,
    ) -> "Node":
        """Bind the tunnel socket, open the DC session, start keepalives; ready to connect/accept.

        `keepalive_interval` paces both the DC keepalives and idle-tunnel keepalives: it must stay
        below the shortest NAT UDP timeout on the way. `last_timestamp`: of the node's newest
        record, so a record signed by a DC failover is newer still. `admit`: which peers may
        open tunnels to us (outbound is always allowed). `inbox`: where Cache Server items for
        us are fetched to (none: items are left for `ntm fetch`); `take_item`: a consumer that keeps
        an item from next_item() (the daemon's group traffic). `dc_pin`: the DC's on-chain address,
        checked against its TLS certificate's binding when `dc_url` is https:// (§5). `route_offer`:
        the routes this node offers, signed, announced to every DC session (§10.10)."""
        ep = await Endpoint.create(
            key, host, port, config=TunnelConfig(keepalive_interval=keepalive_interval), clock=clock, binder=binder
        )
        node = cls(key, dc_url, ep, clock, keepalive_interval, local_addrs, admit, inbox, take_item, dc_pin)
        node.session.last_timestamp = last_timestamp
        node.session.route_offer = route_offer
        try:
            await node.session.start()
        except BaseException:
            await node.close()
            raise
        node.tunnel_table.start()
        if node.mailbox is not None:
            node.mailbox.tasks.spawn(node.mailbox.sweep(dc_url))
        return node

    async def close(self) -> None:
        if self.mailbox is not None:
            await self.mailbox.close()
        await self.tunnel_table.close()
        await self.session.close()
        await self.endpoint.close()

    async def __aenter__(self) -> "Node":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _on_direction(self, obj: dict) -> DirectionAck | None:
        return await self.tunnel_table.on_direction(obj)

    def _on_moved(self) -> None:
        if self.session.udp:  # UDP gets out (again): relays over UDP, not over TCP (§8.4)
            self.endpoint.leave_streams()
        self.endpoint.paths_changed()  # a new network: each path's MTU is probed again (§7 "Path MTU")
        self.tunnel_table.probe_all()

    def _on_notice(self, notice) -> None:
        if self.mailbox is not None:
            self.mailbox.on_notice(notice)

    # --- the embedding API --------------------------------------------------------------------
    async def connect(self, peer: bytes, force_relay: bool = False, fresh: bool = False) -> Tunnel:
        """The working tunnel to `peer`, or a new one: ask the DC for a route and build it;
        NodeError with the reason (at once when the peer refuses) if not. `force_relay`: a tunnel
        pinned to the relay; `fresh`: a new path even if a tunnel works (node/tunnels.py)."""
        return await self.tunnel_table.connect(peer, force_relay, fresh)

    async def accept(self) -> Tunnel:
        """The next tunnel a peer opened to us."""
        return await self.tunnel_table.accept()

    async def next_item(self) -> Received:
        """The next Cache Server item fetched for us (Node.start(..., inbox=DIR))."""
        if self.mailbox is None:
            raise NodeError("no_inbox", "this node was started without an inbox directory")
        return await self.mailbox.next()

    def network_changed(self, why: str = "network changed") -> None:
        """Our address changed (told by the OS/application): reopen the DC session from here and
        probe every tunnel, so peers that can still hear us roam to us."""
        self.session.network_changed(why)

    tunnels = forward("tunnel_table", "table", "Open tunnels by tunnel ID.")
    dc_url = forward("session", "dc_url")
    observed = forward("session", "observed", "Our public address as the DC sees it.")
    home = forward("session", "home", "Set by a DC failover: the new registration, for the CLI's state.")

    def local_addrs(self) -> list[str]:
        return self.session.local_addrs()

    def status(self) -> dict:
        return {
            "node": keys.checksum(self.id),
            **self.session.status(),
            "local": format_endpoint(*self.endpoint.local_addr[:2]),
            "tunnels": self.tunnel_table.status(),
            **self.inbox_status(),
        }

    def inbox_status(self) -> dict:
        """{"inbox": notices seen, items received} when the node fetches Cache Server items."""
        if self.mailbox is None:
            return {}
        return {
            "inbox": {
                "notices": len(self.mailbox.notices),
                "received": [r.describe() for r in self.mailbox.received],
                "held": dict(self.mailbox.held),
            }
        }

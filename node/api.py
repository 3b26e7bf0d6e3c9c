"""The application module: embed a node in an asyncio program, without root and without TUN.

    from node.api import AppNode

    async with await AppNode.start(key, "https://dc1:8330", dc_pin=DC1) as node:    # or AppNode.start(home=path)
        server = await node.start_server(handler, 7000)                # handler(reader, writer)
        reader, writer = await node.open_connection(peer_id, 7000)     # asyncio streams, over QUIC
        await node.send(peer_id, b"datagram"); peer, data = await node.recv()

Streams are reliable, ordered and flow-controlled, many per peer, carried by QUIC inside the
tunnel's datagrams (node/streams.py, docs/PROTOCOL.md §10.9), so they survive the tunnel's roaming
and relay↔direct switches. A peer reaches only the ports the program serves, and only if the
allow list admits it; a refused stream raises StreamRefused with a reason at once.

The names in `__all__` are the stable API; everything else (`.node`, the Node underneath) may change.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import coincurve

from daemon import keystore
from daemon.service import BackgroundTasks
from node import cs_client, state
from node.agent import Node, NodeError
from node.cs_client import Received
from node.endpoint import DEFAULT_PORT
from node.netwatch import follow_addresses
from node.peers import PeerBook
from node.streams import NO_SERVICE, NOT_ALLOWED, Handler, PeerGone, StreamHub, StreamRefused
from node.tunnels import Tunnel
from ntm import keys, seal
from ntm.errors import CodedError
from ntm.overlay import APP, FRAG, QUIC_TO_CLIENT, QUIC_TO_SERVER
from ntm.toobig import Reassembly, pieces
from ntm.tunnel import TunnelError

__all__ = ["AppNode", "StreamServer", "PeerInfo", "Event", "StreamRefused", "PeerGone", "NodeError", "Handler"]


#: Datagrams received and not yet taken by recv(); beyond this the oldest are dropped (UDP-like).
DATAGRAM_QUEUE = 1024
#: Events not yet taken by next_event(); beyond this the oldest are dropped (a program that
#: never asks for events costs nothing more).
EVENT_QUEUE = 256
#: How often our local addresses are compared besides each rtnetlink change (the daemon's value).
ADDRESS_POLL_S = 1.0
#: How long send_offline waits for the DC and the Cache Server (an upload of a few MB).
OFFLINE_TIMEOUT_S = 60.0
#: How often tunnels are checked for having ended (the peer closed them): streams on them fail
#: within this, instead of waiting for the QUIC idle timeout.
TUNNEL_CHECK_S = 0.2


@dataclass(frozen=True)
class PeerInfo:
    """A peer as lookup() found it: its node ID, the route the DCs chose, the path in use."""

    id: bytes
    route: str
    via: str | None
    rtt_s: float | None


@dataclass(frozen=True)
class Event:
    """Something a program may act on: `kind` is "peer_up" (a tunnel to `peer` is ours to use;
    `detail` its path), "peer_down" (it ended), "route" (its path changed: `detail` "old → new",
    e.g. "relay → candidate:0") or "address" (our local addresses changed; `peer` None)."""

    kind: str
    peer: bytes | None
    detail: str


class StreamServer:
    """What start_server() returns: `close()` stops taking new streams on the port."""

    def __init__(self, node: AppNode, port: int) -> None:
        self._node, self.port = node, port

    def close(self) -> None:
        self._node._handlers.pop(self.port, None)


class AppNode:
    """A node inside an application: datagrams and streams to peers by node ID or alias."""

    def __init__(self, node: Node, allow: Collection[bytes] | None, book: PeerBook) -> None:
        self.node = node
        self.allow = allow
        self.book = book
        self._handlers: dict[int, Handler] = {}
        self._links: dict[bytes, Tunnel] = {}
        self._connecting: dict[bytes, asyncio.Task] = {}
        self._datagrams: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue(DATAGRAM_QUEUE)
        self._events: asyncio.Queue[Event] = asyncio.Queue(EVENT_QUEUE)
        self._via: dict[bytes, str | None] = {}  # each peer's path as last reported
        self._piece_id = 0  # numbers QUIC packets sent in pieces (FRAG, §10.9)
        self._reassembly: dict[bytes, Reassembly] = {}
        self.streams = StreamHub(
            node.id, self._send_payload, self._serve, node.endpoint.hold, node.endpoint.flush, node.session.clock
        )
        self.tasks = BackgroundTasks()
        self.tasks.spawn(self._accept_loop())
        self.tasks.spawn(self._watch_loop())
        # a move to another network is told to the DC and the peers at once, as the daemon does
        self.tasks.spawn(follow_addresses(node.local_addrs, self._address_changed, ADDRESS_POLL_S))

    @classmethod
    async def start(
        cls,
        key: coincurve.PrivateKey | None = None,
        dc_url: str | None = None,
        *,
        home: Path | None = None,
        allow: Collection[bytes] | None = None,
        host: str | None = None,
        port: int = DEFAULT_PORT,
        **node_options,
    ) -> AppNode:
        """Start a node from `key` and `dc_url`, or from a node directory (`home`, or $NTM_HOME
        when no key is given: its key, passphrase from $NTM_PASSPHRASE, DC, aliases and allow
        list). `allow`: the peers that may open streams and tunnels to us; None: the home's allow
        list if there is a home, else any peer (they still reach only the ports we serve).
        `node_options` go to Node.start (keepalive_interval, local_addrs, ...)."""
        book = PeerBook()
        if key is None or home is not None:
            home = home or state.home()
            book = PeerBook.load(home)
            st = state.read_state(home)
            if key is None:
                key = keystore.load_keystore(home / state.KEY_FILE, keystore.passphrase(state.PASSPHRASE_ENV))
            dc_url = dc_url or st.get("dc_url") or state.default_dc(home)
            node_options.setdefault("last_timestamp", st.get("timestamp", 0))
            pin = st.get("dc") if st.get("dc_url") == dc_url else state.devnet_dc_address(home, dc_url)
            node_options.setdefault(
                "dc_pin", keys.parse_node_id(pin) if pin else None
            )  # its TLS certificate's key (§5)
            if allow is None:
                allow = book.allow
        if dc_url is None:
            raise NodeError("no_dc", "no DC given and none in the node directory (`ntm register` first)")
        admitted = frozenset(allow) if allow is not None else None
        node = await Node.start(
            key, dc_url, host=host, port=port, admit=lambda peer: admitted is None or peer in admitted, **node_options
        )
        return cls(node, admitted, book)

    @property
    def id(self) -> bytes:
        """Our node ID (20 bytes)."""
        return self.node.id

    async def close(self) -> None:
        """Close every stream (peers' reads fail with "the peer's node closed"), then the node."""
        await self.tasks.cancel()
        await self.streams.close()
        await self.node.close()

    async def __aenter__(self) -> AppNode:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- peers --------------------------------------------------------------------------------
    def resolve(self, peer: bytes | str) -> bytes:
        """A node ID (bytes or 0x… text) or an alias of the home's peer book → node ID;
        ValueError if it is neither."""
        if isinstance(peer, bytes):
            if len(peer) != 20:
                raise ValueError(f"a node ID is 20 bytes, not {len(peer)}")
            return peer
        return self.book.resolve(peer)

    async def lookup(self, peer: bytes | str, force_relay: bool = False) -> PeerInfo:
        """Reach `peer` (its tunnel, made or reused) and say how: NodeError with the DC's reason
        (unknown_node, offline, refused, ...) if it cannot be reached. `force_relay`: from now on
        our datagrams and streams to it go through a relayed tunnel (measurements, tests)."""
        t = await self._tunnel(self.resolve(peer), force_relay)
        return PeerInfo(t.peer, t.kind, t.channel.via, t.channel.rtt)

    # --- datagrams ----------------------------------------------------------------------------
    async def send(self, peer: bytes | str, data: bytes) -> None:
        """One datagram to `peer` (unreliable, as UDP; `ntm send` and `ntm recv` interoperate)."""
        t = await self._tunnel(self.resolve(peer))
        t.channel.send_nowait(bytes([APP]) + data)

    async def recv(self) -> tuple[bytes, bytes]:
        """The next datagram from any peer: (peer ID, data)."""
        return await self._datagrams.get()

    async def next_event(self) -> Event:
        """The next peer up/down, route or address change (oldest first)."""
        return await self._events.get()

    async def send_offline(
        self,
        peers: bytes | str | Collection[bytes | str],
        data: bytes,
        *,
        app: str = "ntm",
        notice: str = "",
        name: str = "",
    ) -> str:
        """Leave `data` sealed for `peers` (one, or several) at our DC's Cache Server, for when they
        are next online; the item ID. Only they can open it (§11); `app` says which application
        it is for, `notice` is what their DC tells them. NodeError if it cannot be stored."""
        targets = [peers] if isinstance(peers, (bytes, str)) else list(peers)
        meta = seal.Meta(app, notice=notice, name=name)
        try:
            res = await cs_client.leave_sealed(
                self.node.key,
                self.node.dc_url,
                [self.resolve(p) for p in targets],
                meta,
                cs_client.bytes_chunks(data),
                len(data),
                self.node.session.clock.wall_ms(),
                OFFLINE_TIMEOUT_S,
            )
        except CodedError as exc:
            raise NodeError(exc.code, str(exc)) from None
        return res["item"]

    async def next_item(self) -> Received:
        """The next Cache Server item for us (start with node_options inbox=DIR)."""
        return await self.node.next_item()

    # --- streams ------------------------------------------------------------------------------
    async def open_connection(self, peer: bytes | str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new reliable stream to `port` on `peer`. StreamRefused (`code`: no_service,
        not_allowed, or the DC's refusal such as offline or unknown_node) if it cannot be opened;
        PeerGone if the peer went away meanwhile. writer.write_eof() half-closes."""
        peer_id = self.resolve(peer)
        try:
            await self._tunnel(peer_id)
        except NodeError as exc:
            raise StreamRefused(exc.code, str(exc)) from None
        return await self.streams.open(peer_id, port)

    async def start_server(self, handler: Handler, port: int) -> StreamServer:
        """Serve `port`: `handler(reader, writer)` (a coroutine function or a plain one) runs for
        every stream an admitted peer opens to it; writer.get_extra_info("peer") is its node ID."""
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is not 0..65535")
        if port in self._handlers:
            raise ValueError(f"port {port} is already served")
        self._handlers[port] = handler
        return StreamServer(self, port)

    # --- plumbing -----------------------------------------------------------------------------
    def _serve(self, peer: bytes, port: int) -> Handler | int:
        if self.allow is not None and peer not in self.allow:
            return NOT_ALLOWED
        return self._handlers.get(port, NO_SERVICE)

    async def _tunnel(self, peer: bytes, force_relay: bool = False) -> Tunnel:
        t = self._links.get(peer)
        if t is not None and not t.channel.closed and (t.pinned_relay or not force_relay):
            return t
        t = await self.node.connect(peer, force_relay)
        self._adopt(t)
        return t

    def _adopt(self, t: Tunnel) -> None:
        """Take a tunnel's payloads (datagrams, QUIC); the newest tunnel to a peer carries our sends."""
        t.channel.set_receiver(lambda payload, peer=t.peer: self._on_payload(peer, payload))
        if t.peer not in self._links:
            self._via[t.peer] = t.channel.via
            self._emit(Event("peer_up", t.peer, str(t.channel.via)))
        self._links[t.peer] = t

    def _emit(self, event: Event) -> None:
        if self._events.full():
            self._events.get_nowait()
        self._events.put_nowait(event)

    def _address_changed(self, why: str) -> None:
        self.node.network_changed(why)
        self._emit(Event("address", None, ", ".join(self.node.local_addrs())))

    def _on_payload(self, peer: bytes, payload: bytes) -> None:
        if not payload:
            return
        kind = payload[0]
        if kind == FRAG:  # a piece of a QUIC packet larger than the path
            joins = self._reassembly.get(peer) or self._reassembly.setdefault(peer, Reassembly())
            payload = joins.add(payload, self.node.session.clock.now())
            if payload is None:
                return
            kind = payload[0]
        if kind in (QUIC_TO_SERVER, QUIC_TO_CLIENT):
            self.streams.on_payload(peer, payload)
        elif kind == APP:
            if self._datagrams.full():
                self._datagrams.get_nowait()
            self._datagrams.put_nowait((peer, payload[1:]))

    def _send_payload(self, peer: bytes, payload: bytes) -> None:
        """QUIC's packets to `peer`: on its tunnel; with none working, lost (QUIC sends again)
        while a new tunnel is made."""
        t = self._links.get(peer)
        if t is None or t.channel.closed:
            t = self.node.tunnel_table.working(peer, False)
            if t is None:
                self._reconnect(peer)
                return
            self._adopt(t)
        self._piece_id += 1
        try:
            for piece in pieces(payload, t.channel.inner_mtu, self._piece_id):
                t.channel.send_nowait(piece)
        except TunnelError:
            pass

    def _reconnect(self, peer: bytes) -> None:
        if peer not in self._connecting:
            self._connecting[peer] = self.tasks.spawn(self._connect_quietly(peer))

    async def _connect_quietly(self, peer: bytes) -> None:
        try:
            await self._tunnel(peer)
        except (NodeError, asyncio.TimeoutError) as exc:
            self.streams.peer_gone(peer, f"{keys.checksum(peer)} cannot be reached: {exc}")
        finally:
            self._connecting.pop(peer, None)

    async def _accept_loop(self) -> None:
        while True:
            self._adopt(await self.node.accept())

    async def _watch_loop(self) -> None:
        """A tunnel the peer closed ends its streams now (the peer's node went away); path
        changes become route events."""
        while True:
            await asyncio.sleep(TUNNEL_CHECK_S)
            for peer, t in list(self._links.items()):
                if t.channel.closed and self.node.tunnel_table.working(peer, False) is None:
                    del self._links[peer]
                    self._via.pop(peer, None)
                    self.streams.peer_gone(peer, f"{keys.checksum(peer)} closed the tunnel")
                    self._emit(Event("peer_down", peer, "the tunnel ended"))
                elif not t.channel.closed and t.channel.via != self._via.get(peer):
                    self._emit(Event("route", peer, f"{self._via.get(peer)} → {t.channel.via}"))
                    self._via[peer] = t.channel.via

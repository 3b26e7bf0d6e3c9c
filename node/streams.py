"""Reliable byte streams to peers: QUIC (aioquic) run inside the tunnel's datagrams (§10.9).

The tunnel already encrypts, authenticates and roams; what it lacks is ordering, retransmission,
congestion and flow control, and many streams per peer. aioquic supplies those. Each QUIC
connection is bound to one peer and sees one fixed "address" (the peer's node ID), so the
tunnel's roaming and relay↔direct switches are invisible to it: only the Link under it moves.

Between two nodes there are at most two QUIC connections, one per direction of opening: the
one A opened as client (its packets to B carry QUIC_TO_SERVER, B's answers QUIC_TO_CLIENT) and
the one B opened. So two ends opening at once never collide. A stream begins with the port
(u16) the opener wants; the server answers one status byte (STREAM_OK or a refusal code) before
any data, so a refused stream fails at once with a reason.

    hub = StreamHub(my_id, send=lambda peer, payload: ..., serve=lambda peer, port: handler or code)
    hub.on_payload(peer, payload)                    # a QUIC_* payload from peer's tunnel
    reader, writer = await hub.open(peer, port)       # StreamRefused / PeerGone on failure
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from typing import Awaitable, Callable

from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamAdapter
from aioquic.buffer import Buffer, BufferReadError
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from daemon import tlspin
from daemon.service import BackgroundTasks
from ntm import keys
from ntm.clock import SYSTEM, Clock
from ntm.overlay import QUIC_TO_CLIENT, QUIC_TO_SERVER

log = logging.getLogger("ntm.streams")

#: ALPN of the inner QUIC: a peer speaking another stream protocol fails the handshake.
STREAM_ALPN = "ntm-stream/1"
#: QUIC packet size: aioquic's Python cost is per packet (~90 µs here, against ~25 µs for the
#: tunnel's), so a stream carries QUIC packets of up to 16000 bytes, each sent as at most 14 tunnel
#: pieces (FRAG, §10.9): CPU per Mbit 8.8 ms at 1200-byte packets, 2.0 at 9000, 1.6 at 16000.
QUIC_DATAGRAM_BYTES = 16000
#: Per-stream and per-connection receive windows: a few RTTs of a fast path; writers are held
#: back (drain) well before the peer's window.
STREAM_WINDOW_BYTES = 2 * 1024 * 1024
CONNECTION_WINDOW_BYTES = 8 * 1024 * 1024
#: A stream's reader pauses it (its window stops moving) once more than 2 × this is unread, so a
#: program that does not read holds the sender back instead of buffering without bound.
STREAM_READ_LIMIT_BYTES = 256 * 1024
#: A writer's drain() waits while more than this is unacknowledged on its stream, and resumes
#: once it is below STREAM_WRITE_LOW_BYTES (backpressure instead of unbounded buffering).
STREAM_WRITE_HIGH_BYTES = 1024 * 1024
STREAM_WRITE_LOW_BYTES = 256 * 1024
#: A QUIC connection that hears nothing this long is dead: longer than a tunnel repair usually
#: takes (§8.3: a move is repaired in seconds), so streams outlive moves; PINGs keep idle ones up.
STREAM_IDLE_TIMEOUT_S = 30.0
STREAM_PING_INTERVAL_S = STREAM_IDLE_TIMEOUT_S / 4
#: How long opening a stream may take (QUIC handshake + the port answer), tunnel already up.
STREAM_OPEN_TIMEOUT_S = 10.0
#: The first bytes of a stream: the port the opener wants (u16), then the server's status byte.
PORT_HEADER = struct.Struct("!H")
STREAM_OK = 0
#: Refusal codes of the status byte and the reason an opener is given.
REFUSALS = {
    1: ("no_service", "the peer serves nothing on that port"),
    2: ("not_allowed", "the peer's allow list does not admit us"),
}
NO_SERVICE, NOT_ALLOWED = 1, 2

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]
# For an incoming stream (peer, port): the handler to run, or a refusal code.
Serve = Callable[[bytes, int], "Handler | int"]
SendPayload = Callable[[bytes, bytes], None]  # (peer, tunnel payload) → sent (or lost)


class StreamRefused(ConnectionRefusedError):
    """The peer refused the stream: `code` (no_service, not_allowed, or the tunnel's refusal)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class PeerGone(ConnectionResetError):
    """The stream's peer went away (closed its node, reset the stream, or stopped answering)."""


def self_signed(node_id: bytes, clock: Clock) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throwaway certificate for the inner TLS server, named after the node ID: the inner TLS needs
    one but nobody checks it (the tunnel authenticates the peer)."""
    return tlspin.self_signed(keys.checksum(node_id), clock)


def quic_config(is_client: bool, cert=None, key=None) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[STREAM_ALPN],
        max_datagram_size=QUIC_DATAGRAM_BYTES,
        idle_timeout=STREAM_IDLE_TIMEOUT_S,
        max_data=CONNECTION_WINDOW_BYTES,
        max_stream_data=STREAM_WINDOW_BYTES,
        verify_mode=ssl.CERT_NONE,
    )
    if not is_client:
        config.certificate, config.private_key = cert, key
    return config


class _WindowedQuic(QuicConnection):
    """aioquic widens a stream's receive window as data *arrives* (doubling it when half is used),
    so a reader that never reads would buffer without bound. Here the window stays
    STREAM_WINDOW_BYTES ahead of what arrived only while the stream's reader is not paused
    (asyncio's StreamReader pauses above 2 × its limit unread): receive-side flow control."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.paused: set[int] = set()  # stream IDs whose readers are full

    def _write_stream_limits(self, builder, space, stream) -> None:
        received = stream.receiver.highest_offset
        if (
            stream.max_stream_data_local
            and stream.stream_id not in self.paused
            and received + STREAM_WINDOW_BYTES // 2 > stream.max_stream_data_local
        ):
            stream.max_stream_data_local = received + STREAM_WINDOW_BYTES
        stream.receiver.highest_offset = 0  # keeps aioquic's own doubling rule off; it only sends the frame
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            stream.receiver.highest_offset = received


class _TunnelTransport:
    """What QuicConnectionProtocol sends through: the peer's tunnel, behind one kind byte."""

    def __init__(self, send: SendPayload, peer: bytes, kind: int) -> None:
        self.send, self.peer, self.prefix = send, peer, bytes([kind])

    def sendto(self, data: bytes, addr) -> None:
        self.send(self.peer, self.prefix + data)


class _Stream(QuicStreamAdapter):
    """A stream's transport with backpressure (drain waits on unacknowledged bytes) and the peer
    and port in get_extra_info("peer"), ("port")."""

    def __init__(self, protocol: PeerQuic, stream_id: int) -> None:
        super().__init__(protocol, stream_id)
        self.reader_protocol: asyncio.StreamReaderProtocol | None = None
        self.paused = False
        self.port: int | None = None

    def get_extra_info(self, name: str, default=None):
        if name == "peer":
            return self.protocol.peer
        if name == "port":
            return self.port
        return super().get_extra_info(name, default)

    def unacked(self) -> int:
        stream = self.protocol._quic._streams.get(self.stream_id)
        return len(stream.sender._buffer) if stream is not None else 0

    def write(self, data) -> None:
        if self.protocol.ended is not None:
            raise self.protocol.ended
        super().write(data)
        if not self.paused and self.unacked() > STREAM_WRITE_HIGH_BYTES:
            self.paused = True
            self.reader_protocol.pause_writing()

    def maybe_resume(self) -> None:
        if self.paused and self.unacked() < STREAM_WRITE_LOW_BYTES:
            self.paused = False
            self.reader_protocol.resume_writing()

    def pause_reading(self) -> None:
        """The reader is full: the peer's window for this stream stops moving."""
        self.protocol._quic.paused.add(self.stream_id)

    def resume_reading(self) -> None:
        self.protocol._quic.paused.discard(self.stream_id)
        self.protocol._transmit_soon()  # the window update goes out now

    def is_reading(self) -> bool:
        return self.stream_id not in self.protocol._quic.paused

    def abort(self) -> None:
        """Reset the stream (both ways): the peer's reads fail."""
        quic = self.protocol._quic
        if self.stream_id in quic._streams:
            quic.reset_stream(self.stream_id, 0)
            self.protocol._transmit_soon()
        self._closing = True


class PeerQuic(QuicConnectionProtocol):
    """One QUIC connection to `peer` inside its tunnel (client or server side)."""

    def __init__(self, hub: StreamHub, peer: bytes, quic: QuicConnection) -> None:
        super().__init__(quic, stream_handler=lambda r, w: hub._incoming(self, r, w))
        self.hub = hub
        self.peer = peer
        self.address = (keys.checksum(peer), 0)  # the one fixed "address": the tunnel, not the UDP path
        self.streams: dict[int, _Stream] = {}
        self.ended: PeerGone | None = None

    def _create_stream(self, stream_id: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        adapter = _Stream(self, stream_id)
        reader = asyncio.StreamReader(limit=STREAM_READ_LIMIT_BYTES)
        reader.set_transport(adapter)  # so a full reader pauses its stream (flow control)
        protocol = asyncio.StreamReaderProtocol(reader)
        adapter.reader_protocol = protocol
        writer = asyncio.StreamWriter(adapter, protocol, reader, self._loop)
        self._stream_readers[stream_id] = reader
        self.streams[stream_id] = adapter
        return reader, writer

    def datagram_received(self, data: bytes, addr) -> None:
        """Take a packet; answer (ACKs, more data) once per event-loop pass, not per packet: the
        endpoint reads up to 64 datagrams per pass, so the peer gets one ACK for a burst."""
        self._quic.receive_datagram(data, addr, now=self._loop.time())
        self._process_events()
        self._transmit_soon()

    def transmit(self) -> None:
        self.hub.hold()  # one system call for a run of packets (UDP GSO), not one each
        try:
            super().transmit()
        finally:
            self.hub.flush()
        for sid, s in list(self.streams.items()):
            s.maybe_resume()
            self._forget_if_done(sid)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            why = event.reason_phrase or f"QUIC error {event.error_code}"
            self.end(PeerGone(f"the connection to {keys.checksum(self.peer)} ended: {why}"))
            return
        if isinstance(event, events.StreamReset):
            self._lose(event.stream_id, PeerGone(f"{keys.checksum(self.peer)} reset the stream"))
            return
        super().quic_event_received(event)

    def end(self, exc: PeerGone) -> None:
        """The connection is over: every stream's reads and drains fail with `exc` (buffered data
        that was complete stays readable)."""
        if self.ended is None:
            self.ended = exc
            for sid in list(self.streams):
                self._lose(sid, exc)

    def _lose(self, stream_id: int, exc: PeerGone) -> None:
        adapter = self.streams.pop(stream_id, None)
        reader = self._stream_readers.pop(stream_id, None)
        if adapter is None or reader is None:
            return
        if reader.at_eof() or not reader._eof:  # nothing complete left unread: fail reads at once
            adapter.reader_protocol.connection_lost(exc)
        else:  # the whole stream arrived: it stays readable; writes and drains fail
            adapter.reader_protocol._connection_lost = True
            adapter.reader_protocol.resume_writing()

    def _forget_if_done(self, stream_id: int) -> None:
        """Both directions finished (our FIN acknowledged, theirs received): drop our references;
        the reader keeps its buffered data, and aioquic ignores frames of finished streams."""
        adapter = self.streams.get(stream_id)
        reader = self._stream_readers.get(stream_id)
        if (
            adapter is not None
            and reader is not None
            and reader._eof
            and adapter.is_closing()
            and adapter.unacked() == 0
        ):
            self.streams.pop(stream_id, None)
            self._stream_readers.pop(stream_id, None)


class StreamHub:
    """This node's QUIC connections, at most two per peer (ours as client, theirs as server)."""

    def __init__(
        self,
        my_id: bytes,
        send: SendPayload,
        serve: Serve,
        hold: Callable[[], None] = lambda: None,
        flush: Callable[[], None] = lambda: None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.send = send
        self.serve = serve
        self.hold, self.flush = hold, flush  # batch the sends of one transmit (Endpoint.hold/flush)
        self.cert, self.key = self_signed(my_id, clock)
        self.clients: dict[bytes, PeerQuic] = {}
        self.servers: dict[bytes, PeerQuic] = {}
        self._server_dcid: dict[bytes, bytes] = {}
        self.tasks = BackgroundTasks()
        self.tasks.spawn(self._keepalive())

    # --- from the tunnels ---------------------------------------------------------------------
    def on_payload(self, peer: bytes, payload: bytes) -> None:
        """A QUIC_TO_SERVER or QUIC_TO_CLIENT payload from `peer`'s tunnel (authenticated)."""
        data = payload[1:]
        if payload[0] == QUIC_TO_CLIENT:
            conn = self.clients.get(peer)
        else:
            conn = self._server_for(peer, data)
        if conn is not None:
            conn.datagram_received(data, conn.address)

    def _server_for(self, peer: bytes, data: bytes) -> PeerQuic | None:
        """The server connection `peer` opened; a new one for an Initial with a new connection ID
        (the peer started afresh: its old connection is gone)."""
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except (ValueError, BufferReadError):
            return None
        conn = self.servers.get(peer)
        if header.packet_type != QuicPacketType.INITIAL or (
            conn is not None and self._knows(peer, conn, header.destination_cid)
        ):
            return conn
        if conn is not None:
            conn.end(PeerGone(f"{keys.checksum(peer)} started a new connection"))
        quic = _WindowedQuic(
            configuration=quic_config(False, self.cert, self.key),
            original_destination_connection_id=header.destination_cid,
        )
        conn = self._attach(peer, quic, QUIC_TO_CLIENT)
        self.servers[peer], self._server_dcid[peer] = conn, header.destination_cid
        return conn

    def _knows(self, peer: bytes, conn: PeerQuic, dcid: bytes) -> bool:
        """Is `dcid` the connection's: the ID the peer first chose, or one we issued since?"""
        return dcid == self._server_dcid.get(peer) or any(c.cid == dcid for c in conn._quic._host_cids)

    def _attach(self, peer: bytes, quic: QuicConnection, kind: int) -> PeerQuic:
        conn = PeerQuic(self, peer, quic)
        conn.connection_made(_TunnelTransport(self.send, peer, kind))
        return conn

    # --- opening ------------------------------------------------------------------------------
    async def open(self, peer: bytes, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new stream to `port` on `peer` (its tunnel must be up); StreamRefused with the
        reason, or PeerGone / TimeoutError, if not."""
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is not 0..65535")
        async with asyncio.timeout(STREAM_OPEN_TIMEOUT_S):
            conn = await self._client(peer)
            reader, writer = await conn.create_stream()
            writer.transport.port = port
            writer.write(PORT_HEADER.pack(port))
            try:
                status = (await reader.readexactly(1))[0]
            except asyncio.IncompleteReadError:
                raise PeerGone(f"{keys.checksum(peer)} closed the stream before answering") from None
        if status != STREAM_OK:
            code, why = REFUSALS.get(status, ("refused", f"refusal code {status}"))
            writer.transport.abort()
            raise StreamRefused(code, why)
        return reader, writer

    async def _client(self, peer: bytes) -> PeerQuic:
        conn = self.clients.get(peer)
        if conn is None or conn.ended is not None:
            quic = _WindowedQuic(configuration=quic_config(True))
            conn = self._attach(peer, quic, QUIC_TO_SERVER)
            self.clients[peer] = conn
            conn.connect(conn.address)
        try:
            await asyncio.shield(self._connected(conn))
        except ConnectionError:
            raise conn.ended or PeerGone(f"no QUIC handshake with {keys.checksum(peer)}") from None
        return conn

    @staticmethod
    async def _connected(conn: PeerQuic) -> None:
        if not conn._connected:
            if conn._connected_waiter is None:
                await conn.wait_connected()
            else:
                await asyncio.shield(conn._connected_waiter)

    # --- serving ------------------------------------------------------------------------------
    def _incoming(self, conn: PeerQuic, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if conn.peer not in self.clients or self.clients[conn.peer] is not conn:
            self.tasks.spawn(self._accept(conn, reader, writer))
        else:  # a server may not open streams on our client connection: nothing is served there
            writer.transport.abort()

    async def _accept(self, conn: PeerQuic, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(STREAM_OPEN_TIMEOUT_S):
                (port,) = PORT_HEADER.unpack(await reader.readexactly(PORT_HEADER.size))
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            writer.transport.abort()
            return
        writer.transport.port = port
        verdict = self.serve(conn.peer, port)
        if isinstance(verdict, int):
            writer.write(bytes([verdict]))
            writer.write_eof()
            return
        writer.write(bytes([STREAM_OK]))
        try:
            result = verdict(reader, writer)
            if asyncio.iscoroutine(result):
                await result
        except ConnectionError as exc:
            log.info("stream from %s on port %d ended: %s", keys.checksum(conn.peer), port, exc)
        except Exception:
            log.exception("stream handler for port %d failed", port)
            writer.transport.abort()

    # --- upkeep -------------------------------------------------------------------------------
    async def _keepalive(self) -> None:
        """PING connections that have open streams, so an idle stream outlives the idle timeout."""
        while True:
            await asyncio.sleep(STREAM_PING_INTERVAL_S)
            for conn in [*self.clients.values(), *self.servers.values()]:
                if conn.ended is None and conn.streams:
                    conn._quic.send_ping(0)
                    conn.transmit()

    def peer_gone(self, peer: bytes, why: str) -> None:
        """The tunnel to `peer` ended for good: its streams fail now, not at the idle timeout."""
        for table in (self.clients, self.servers):
            conn = table.pop(peer, None)
            if conn is not None:
                conn.end(PeerGone(why))

    async def close(self, why: str = "the peer's node closed") -> None:
        """Close every connection, telling peers (their streams fail with `why`)."""
        await self.tasks.cancel()
        for conn in [*self.clients.values(), *self.servers.values()]:
            if conn.ended is None:
                conn.close(reason_phrase=why)
                conn.end(PeerGone("this node closed"))
            if conn._timer is not None:
                conn._timer.cancel()
        self.clients.clear()
        self.servers.clear()

"""The relay's stream transport (docs/PROTOCOL.md §8.4): tunnel packets over a WebSocket on
TCP port 443, for nodes whose network lets no UDP out (hotel, corporate and some mobile networks
allow only web traffic).

One WebSocket binary message carries exactly one tunnel packet, the same opaque bytes a node
would send over UDP. Each connection is one *address* to the relay table (`StreamAddr`): binds,
cookies, byte caps, lifetimes and idle expiry are the table's, exactly as for UDP, so a node on a
stream and a node on UDP meet on one path and the relay still holds no key. What the stream adds
is bounded here: how many connections, how long one may stay without carrying a path, how many
packets may wait for a slow reader.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import WSMsgType, web

from daemon.service import BackgroundTasks
from ntm import packet
from ntm.clock import Clock

log = logging.getLogger("ntm.rs.stream")

STREAM_PATH = "/v1/stream"
# Simultaneous stream connections: each holds a TCP socket and a few KB; beyond this new ones get
# 503 (the node tries the next relay the DC named).
MAX_STREAMS = 10_000
# ... and from one source address: a stranger cannot hold them all, while a carrier-grade NAT with
# many nodes behind one address still gets a few hundred (each node needs one per relay).
MAX_STREAMS_PER_SOURCE = 256
# Packets waiting for one connection's TCP send: ~360 KB of full-size packets absorb a burst; more
# means the reader is slower than its path, and they are dropped as a full UDP buffer would.
STREAM_QUEUE_PACKETS = 256
# A connection that forwarded nothing this long after it opened is closed: a node binds and
# carries its handshake within a second or two, and an idle socket costs us more than a stray
# datagram would.
STREAM_FIRST_TRAFFIC_S = 10.0
# ... and once it carried traffic, it may stay silent as long as a relay path may (tunnel
# keepalives every 25 s keep a live one busy).
STREAM_IDLE_S = 90.0
# WebSocket ping period: a peer that stops answering (no pong) is dropped within ~1.5 periods.
STREAM_HEARTBEAT_S = 15.0


@dataclass(frozen=True)
class StreamAddr:
    """One stream connection, as the relay table sees it: an address like a UDP one."""

    conn: int
    peer: str  # the TCP peer, for logs only

    def __str__(self) -> str:
        return f"stream#{self.conn} ({self.peer})"


@dataclass
class StreamConn:
    addr: StreamAddr
    ws: web.WebSocketResponse
    opened: float
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(STREAM_QUEUE_PACKETS))
    last_forwarded: float | None = None
    writer: asyncio.Task | None = None


class StreamHub:
    """The stream connections of one relay. `deliver(packet, addr)` hands a received packet to
    the relay (which answers through `send`)."""

    def __init__(
        self, deliver: Callable[[bytes, StreamAddr], None], clock: Clock, max_streams: int = MAX_STREAMS
    ) -> None:
        self.deliver = deliver
        self.clock = clock
        self.max_streams = max_streams
        self.conns: dict[StreamAddr, StreamConn] = {}
        self.per_source: Counter[str] = Counter()  # open connections by source IP
        self._ids = itertools.count(1)
        self.counters: Counter[str] = Counter()
        self.tasks = BackgroundTasks()  # closes of idle connections

    def send(self, data: bytes, dest: StreamAddr) -> None:
        """Queue a packet for a connection; dropped (and counted) if it is gone or backed up."""
        conn = self.conns.get(dest)
        if conn is None:
            self.counters["drop_gone"] += 1
            return
        try:
            conn.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.counters["drop_backlog"] += 1

    def forwarded(self, addr: StreamAddr) -> None:
        """The table forwarded a packet from or to this connection: it carries a path."""
        conn = self.conns.get(addr)
        if conn is not None:
            conn.last_forwarded = self.clock.now()

    def expire(self) -> int:
        """Close connections that carry nothing (see STREAM_FIRST_TRAFFIC_S, STREAM_IDLE_S)."""
        now = self.clock.now()
        idle = [
            c
            for c in self.conns.values()
            if (c.last_forwarded is None and now - c.opened > STREAM_FIRST_TRAFFIC_S)
            or (c.last_forwarded is not None and now - c.last_forwarded > STREAM_IDLE_S)
        ]
        for c in idle:
            self.counters["closed_idle"] += 1
            self.tasks.spawn(c.ws.close(message=b"idle"))
        return len(idle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/stream (WebSocket upgrade): binary messages in and out, one packet each."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        source = peer[0] if peer else "?"
        if len(self.conns) >= self.max_streams:
            self.counters["refused_full"] += 1
            return web.json_response(
                {"error": "full", "message": f"relay has {self.max_streams} streams open"}, status=503
            )
        if self.per_source[source] >= MAX_STREAMS_PER_SOURCE:
            self.counters["refused_source"] += 1
            return web.json_response({"error": "too_many", "message": "too many streams from this address"}, status=429)
        ws = web.WebSocketResponse(heartbeat=STREAM_HEARTBEAT_S, max_msg_size=packet.MAX_DATAGRAM)
        await ws.prepare(request)
        addr = StreamAddr(next(self._ids), f"{source}:{peer[1]}" if peer else "?")
        conn = StreamConn(addr, ws, self.clock.now())
        conn.writer = asyncio.create_task(self._write(conn))
        self.conns[addr] = conn
        self.per_source[source] += 1
        self.counters["opened"] += 1
        log.debug("%s opened", addr)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.BINARY:
                    self.counters["rx_packets"] += 1
                    self.deliver(msg.data, addr)
                else:  # text, or a frame too big for a packet (ERROR): not a node's; end the stream
                    self.counters["refused_frame"] += 1
                    await ws.close(message=b"one tunnel packet per binary frame")
                    break
        finally:
            del self.conns[addr]
            self.per_source[source] -= 1
            if not self.per_source[source]:
                del self.per_source[source]
            conn.writer.cancel()
            log.debug("%s closed", addr)
        return ws

    async def _write(self, conn: StreamConn) -> None:
        try:
            while True:
                data = await conn.queue.get()
                await conn.ws.send_bytes(data)
                self.counters["tx_packets"] += 1
        except (ConnectionError, RuntimeError):
            await conn.ws.close()

    async def close(self) -> None:
        for c in list(self.conns.values()):
            await c.ws.close(message=b"relay shutting down")

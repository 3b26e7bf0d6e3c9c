"""Tunnel packets to a relay over a WebSocket on TCP (docs/PROTOCOL.md §8.4), for a node whose
network lets no UDP out.

The endpoint keeps one `RelayStream` per relay address it reaches this way. Sessions are not told:
a packet they address to the relay's UDP endpoint goes into the stream instead, and what the
relay sends back comes out of `receive(packet, relay address)` as if it had arrived over UDP, so
binds, cookies, roaming and the relay fallback are the tunnel's own, unchanged.

A stream reconnects by itself (with backoff) while it is wanted; packets sent while it is
connecting wait in a small bounded queue, and the tunnel's own retransmissions cover the rest.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Callable

import aiohttp

from ntm import packet
from ntm.addr import Addr

log = logging.getLogger("ntm.node.stream")

# Packets waiting to be written (or for the connection): a burst of full-size packets; beyond it
# they are dropped as a full UDP socket buffer would drop them.
STREAM_QUEUE_PACKETS = 1024
# How long one connection attempt may take (TCP, TLS, WebSocket upgrade) before the next.
STREAM_CONNECT_TIMEOUT_S = 5.0
# WebSocket ping period: a relay that stops answering is noticed within ~1.5 periods and the
# stream is reopened.
STREAM_HEARTBEAT_S = 5.0
# Backoff between connection attempts: quick after a drop, never hammering a relay that is down.
STREAM_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)


def stream_tls_context() -> ssl.SSLContext:
    """TLS here hides the stream among web traffic; it authenticates nothing the tunnel needs:
    every packet is end-to-end encrypted and authenticated, and the relay binds a side only to
    a bind MAC'd with that side's key (§8.2), so the relay's certificate is not checked."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RelayStream:
    """One relay reached over a stream; `send` never blocks."""

    def __init__(self, addr: Addr, urls: list[str], receive: Callable[[bytes, Addr], None]) -> None:
        """`urls`: the relay's stream URLs, tried in turn until one connects."""
        self.addr = addr
        self.urls = urls
        self.url = urls[0]
        self.receive = receive
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(STREAM_QUEUE_PACKETS)
        self.connected = False
        self.stats = {"connects": 0, "drops": 0, "tx_packets": 0, "rx_packets": 0, "dropped_backlog": 0}
        self._task = asyncio.get_running_loop().create_task(self._run())

    def send(self, data: bytes) -> None:
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.stats["dropped_backlog"] += 1

    async def _run(self) -> None:
        attempt = 0
        async with aiohttp.ClientSession() as http:
            while True:
                self.url = self.urls[attempt % len(self.urls)]
                tls = stream_tls_context() if self.url.startswith("wss:") else False
                try:
                    ws = await asyncio.wait_for(
                        http.ws_connect(
                            self.url, heartbeat=STREAM_HEARTBEAT_S, ssl=tls, max_msg_size=packet.MAX_DATAGRAM
                        ),
                        STREAM_CONNECT_TIMEOUT_S,
                    )
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    delay = STREAM_RETRY_S[min(attempt, len(STREAM_RETRY_S) - 1)]
                    attempt += 1
                    log.info("relay stream %s: cannot connect (%s); retrying in %.1f s", self.url, exc, delay)
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                self.connected = True
                self.stats["connects"] += 1
                log.info("relay stream %s connected", self.url)
                writer = asyncio.create_task(self._write(ws))
                try:
                    async for msg in ws:
                        if msg.type is aiohttp.WSMsgType.BINARY:
                            self.stats["rx_packets"] += 1
                            self.receive(msg.data, self.addr)
                finally:
                    writer.cancel()
                    self.connected = False
                    await ws.close()
                self.stats["drops"] += 1
                log.info("relay stream %s closed; reconnecting", self.url)
                await asyncio.sleep(STREAM_RETRY_S[0])

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            while True:
                data = await self.queue.get()
                await ws.send_bytes(data)
                self.stats["tx_packets"] += 1
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            await ws.close()

    def stop(self) -> None:
        """Close the stream (its task ends; nothing waits for the relay)."""
        self._task.cancel()

    async def close(self) -> None:
        self.stop()
        await asyncio.gather(self._task, return_exceptions=True)

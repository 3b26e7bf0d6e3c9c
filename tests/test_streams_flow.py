"""Stream flow control on two StreamHubs joined in memory (real aioquic, no sockets): fast."""

from __future__ import annotations

import asyncio
import hashlib
import os

from node.streams import NO_SERVICE, STREAM_READ_LIMIT_BYTES, STREAM_WINDOW_BYTES, StreamHub

TOTAL_BYTES = 8 * 1024 * 1024
CHUNK_BYTES = 64 * 1024


def hub_pair(serve) -> tuple[StreamHub, StreamHub, bytes]:
    """Hubs A and B (B serving with `serve`) whose QUIC packets reach each other on the next
    event-loop pass; and B's node ID."""
    loop = asyncio.get_running_loop()
    ida, idb = os.urandom(20), os.urandom(20)
    hubs: dict[bytes, StreamHub] = {}

    def sender(src: bytes):
        return lambda peer, payload: loop.call_soon(hubs[peer].on_payload, src, payload)

    hubs[ida] = StreamHub(ida, sender(ida), lambda peer, port: NO_SERVICE)
    hubs[idb] = StreamHub(idb, sender(idb), serve)
    return hubs[ida], hubs[idb], idb


async def until_still(value, quiet_s: float = 0.3, limit_s: float = 20.0) -> None:
    """Wait until value() stops changing for quiet_s."""
    loop = asyncio.get_running_loop()
    deadline, last, since = loop.time() + limit_s, value(), loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.05)
        if value() != last:
            last, since = value(), loop.time()
        elif loop.time() - since >= quiet_s:
            return
    raise AssertionError("still moving")


async def test_a_reader_that_does_not_read_holds_the_writer_back():
    """A receiving program that stops reading (a slow consumer, or a peer that wants to make us
    buffer without bound): the sender's drain() blocks once the receiver holds about its read
    limit plus one stream window; when the reader reads again everything arrives intact."""
    readers: asyncio.Queue = asyncio.Queue()
    a, b, b_id = hub_pair(lambda peer, port: lambda reader, writer: readers.put_nowait(reader))
    data = os.urandom(TOTAL_BYTES)
    written = 0
    try:
        _, writer = await a.open(b_id, 7)

        async def write_all() -> None:
            nonlocal written
            for i in range(0, TOTAL_BYTES, CHUNK_BYTES):
                writer.write(data[i : i + CHUNK_BYTES])
                written += CHUNK_BYTES
                await writer.drain()
            writer.write_eof()

        sending = asyncio.ensure_future(write_all())
        reader = await asyncio.wait_for(readers.get(), 10)
        await until_still(lambda: written)
        buffered = len(reader._buffer)
        assert not sending.done() and written < TOTAL_BYTES / 2
        assert buffered <= 2 * STREAM_READ_LIMIT_BYTES + STREAM_WINDOW_BYTES + CHUNK_BYTES, buffered
        got = await asyncio.wait_for(reader.read(), 60)
        await asyncio.wait_for(sending, 10)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    finally:
        await a.close()
        await b.close()

"""`ntm nc` and `ntm serve`: the command side of the daemon's stream sockets (node/daemon_streams.py).

`ntm nc PEER PORT` is a netcat over the overlay: stdin goes to a stream to PORT on PEER (EOF on
stdin half-closes it), what the peer sends goes to stdout, and the command ends when the peer
ends its side: exit 0, or 1 with the reason if the stream was refused or broke.
`ntm serve PORT --to 127.0.0.1:LOCAL` lets allowed peers open streams to PORT, each connected to
the local TCP service, for as long as the command runs.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import BinaryIO, Callable

import aiohttp

from node import control
from node.control import ControlError
from node.daemon_streams import EOF_MESSAGE, SPLICE_CHUNK_BYTES

#: Chunks read from stdin ahead of the socket (backpressure: the reader thread waits beyond this).
STDIN_CHUNKS_AHEAD = 4


async def _answer(ws: aiohttp.ClientWebSocketResponse) -> dict:
    """The daemon's first message: {"ok": ...}, or ControlError with its refusal."""
    msg = await ws.receive()
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise ControlError("failed", "the daemon closed the stream socket without answering")
    answer = msg.json()
    if "error" in answer:
        raise ControlError(answer["error"], answer.get("message", answer["error"]))
    return answer


async def nc(base: Path, peer: str, port: int, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Splice stdin/stdout to a stream to `port` on `peer` until the peer's EOF."""
    async with control.open_socket(base, "nc", {"peer": peer, "port": str(port)}) as ws:
        await _answer(ws)
        chunks = read_in_thread(stdin)

        async def send_stdin() -> None:
            while data := await chunks.get():
                await ws.send_bytes(data)
            await ws.send_str(EOF_MESSAGE)

        sending = asyncio.ensure_future(send_stdin())
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    stdout.write(msg.data)
                    stdout.flush()
                elif msg.type == aiohttp.WSMsgType.TEXT and msg.data == EOF_MESSAGE:
                    return
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    answer = msg.json()
                    raise ControlError(answer.get("error", "failed"), answer.get("message", "the stream broke"))
            raise ControlError("failed", "the daemon ended the stream (did it stop?)")
        finally:
            sending.cancel()


async def serve(base: Path, port: int, to: str, on_event: Callable[[dict], None]) -> None:
    """Serve `port` to allowed peers, connected to the local service `to`, until interrupted."""
    async with control.open_socket(base, "serve", {"port": str(port), "to": to}) as ws:
        on_event(await _answer(ws))
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                on_event(msg.json())
    raise ControlError("failed", "the daemon stopped serving (did it stop?)")


def read_in_thread(source: BinaryIO) -> asyncio.Queue[bytes]:
    """`source`'s chunks (b"" at EOF), read by a daemon thread: a terminal's blocking read must
    not keep the command from exiting when the peer has ended the stream."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue(STDIN_CHUNKS_AHEAD)

    def pump() -> None:
        while True:
            data = source.read1(SPLICE_CHUNK_BYTES)
            try:
                asyncio.run_coroutine_threadsafe(chunks.put(data), loop).result()
            except RuntimeError:  # the command has ended (its event loop is closed)
                return
            if not data:
                return

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return chunks

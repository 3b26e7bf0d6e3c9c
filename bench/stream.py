"""Stream benchmark: QUIC streams inside tunnels (node/api.py) between two embedded nodes on
loopback, with real DCs, an RS and anvil (labkit/dcnet.py); prints `metric: value` lines.

  stream_mbps               one stream, one direction, over a direct tunnel (payload Mbit/s)
  stream_relay_mbps         the same through the relay (a tunnel pinned to the RS)
  stream_handover_stall_s   a stream running while the sender's socket moves to another address
                            and port (the tunnel roams): the longest gap in what the receiver
                            gets, from the move to the end of the transfer
  tunnel_goodput_mbps       bench/tunnel.py's datagram goodput (1200-byte datagrams), measured
                            right after each direct stream round (interleaved: the machine is shared)
  stream_vs_tunnel_ratio    median over rounds of stream_mbps / tunnel_goodput_mbps of the same
                            round (issue 25's target: >= 0.5)
  stream_cpu_ms_per_mbit    this process's CPU time per Mbit a direct stream carries (both ends
                            are in this process), and tunnel_cpu_ms_per_mbit for the datagrams:
                            what the throughput figures become on an idle core

usage: python bench/stream.py [--mb 40] [--quick]     (--quick: tiny sizes, same code paths)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tunnel import bench_tunnel  # noqa: E402
from node.api import AppNode  # noqa: E402
from labkit.dcnet import node_federation  # noqa: E402

#: The writer's chunk: large enough that Python's per-call cost does not dominate.
CHUNK_BYTES = 1 << 16
SINK_PORT = 9


class Sink:
    """Port SINK_PORT: counts what arrives and the largest gap between arrivals after `mark()`."""

    def __init__(self) -> None:
        self.done: asyncio.Future[int] | None = None
        self.marked_at: float | None = None
        self.max_gap = 0.0

    def expect(self) -> asyncio.Future[int]:
        self.done = asyncio.get_running_loop().create_future()
        self.marked_at, self.max_gap = None, 0.0
        return self.done

    def mark(self) -> None:
        self.marked_at = time.perf_counter()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n, last = 0, None
        while data := await reader.read(1 << 18):
            n += len(data)
            now = time.perf_counter()
            if self.marked_at is not None:
                self.max_gap = max(self.max_gap, now - max(last or now, self.marked_at))
            last = now
        self.done.set_result(n)


async def send_stream(a: AppNode, b: AppNode, sink: Sink, nbytes: int, move_at: float | None = None) -> float:
    """Send `nbytes` over one new stream a→b; Mbit/s of payload. `move_at` (0..1): move a's
    socket to 127.0.0.2 (new port) once that share is written."""
    done = sink.expect()
    reader, writer = await a.open_connection(b.id, SINK_PORT)
    chunk = bytes(CHUNK_BYTES)
    t0 = time.perf_counter()
    sent = 0
    moved = move_at is None
    while sent < nbytes:
        if not moved and sent >= nbytes * move_at:
            sink.mark()
            await a.node.endpoint.rebind(
                "127.0.0.2" if a.node.endpoint.local_addr[0] != "127.0.0.2" else "127.0.0.1", 0
            )
            moved = True
        writer.write(chunk)
        sent += len(chunk)
        await writer.drain()
    writer.write_eof()
    got = await asyncio.wait_for(done, 600)
    elapsed = time.perf_counter() - t0
    if got != sent:
        raise RuntimeError(f"sent {sent} bytes, the receiver got {got}")
    writer.close()
    return sent * 8 / elapsed / 1e6


async def measured(coro) -> tuple[float, float]:
    """(the coroutine's Mbit/s, this process's CPU ms per Mbit it carried)."""
    cpu = time.process_time()
    t0 = time.perf_counter()
    mbps = await coro
    megabits = mbps * (time.perf_counter() - t0)
    return mbps, (time.process_time() - cpu) * 1000 / megabits


async def bench_streams(nbytes: int, rounds: int, tunnel_s: float) -> dict[str, float]:
    """Two pairs of embedded nodes (one direct, one pinned to the relay) on a loopback federation;
    each direct round is followed by a tunnel datagram round (bench/tunnel.py) for the ratio."""
    async with node_federation(AppNode) as (net, start):
        a, b, c, d = [await start(net.urls[i % 2]) for i in range(4)]
        sinks = [Sink(), Sink()]
        await b.start_server(sinks[0], SINK_PORT)
        await d.start_server(sinks[1], SINK_PORT)
        await c.lookup(d.id, force_relay=True)
        direct, tunnel = [], []
        for _ in range(rounds):
            direct.append(await measured(send_stream(a, b, sinks[0], nbytes)))
            tunnel.append(await measured(tunnel_mbps(tunnel_s)))
        relay = [await send_stream(c, d, sinks[1], nbytes) for _ in range(rounds)]
        stalls = []
        for _ in range(rounds):
            await send_stream(a, b, sinks[0], nbytes, move_at=0.5)
            stalls.append(sinks[0].max_gap)
    return {
        "stream_mbps": statistics.median(m for m, _ in direct),
        "stream_relay_mbps": statistics.median(relay),
        "stream_handover_stall_s": statistics.median(stalls),
        "tunnel_goodput_mbps": statistics.median(m for m, _ in tunnel),
        "stream_vs_tunnel_ratio": statistics.median(s[0] / t[0] for s, t in zip(direct, tunnel)),
        "stream_cpu_ms_per_mbit": statistics.median(c for _, c in direct),
        "tunnel_cpu_ms_per_mbit": statistics.median(c for _, c in tunnel),
    }


async def tunnel_mbps(seconds: float) -> float:
    mbps, _, _ = await bench_tunnel(bytes(1200), seconds, handshakes=1)
    return mbps


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=40.0, help="megabytes per stream measurement")
    ap.add_argument("--rounds", type=int, default=3, help="medians of this many")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: the same code paths")
    args = ap.parse_args()
    mb, rounds, seconds = (2.0, 1, 0.3) if args.quick else (args.mb, args.rounds, 1.5)
    results = await bench_streams(int(mb * 1e6), rounds, seconds)
    print(f"stream_bytes: {int(mb * 1e6)}")
    for name, value in results.items():
        print(f"{name}: {value:.3f}" if name.endswith(("_s", "_ratio")) else f"{name}: {value:.1f}")


if __name__ == "__main__":
    asyncio.run(main())

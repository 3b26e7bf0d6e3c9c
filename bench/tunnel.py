"""Tunnel benchmark on real loopback UDP sockets; prints `metric: value` lines.

Both measurements use the same shape, in one asyncio loop: the sender writes a window of
WINDOW datagrams of PAYLOAD bytes, the receiver's datagram callback counts them, and the sender
writes the next window when the previous one arrived (or after LOSS_WAIT, counting only what
arrived). Goodput = payload bytes delivered / elapsed time.
  payload_bytes        the datagram payload used
  udp_goodput_mbps / udp_pps        plain asyncio DatagramProtocol -> DatagramProtocol
  tunnel_goodput_mbps / tunnel_pps  Channel.send_nowait -> Endpoint -> Session (AES-256-GCM, replay window)
  tunnel_goodput_ratio_vs_udp       median of the per-round ratios
  handshake_ms_p50     Endpoint.open on both sides until both report the handshake done
  signal_same_dc_p50_ms / signal_cross_dc_p50_ms / signal_cross_dc_p95_ms
                       real anvil + two DC processes + RS: Node.connect (Direction Request) until
                       the peer has decrypted the first byte, peer at the same DC / another DC;
                       each sample the first tunnel between its two nodes (connect() reuses a
                       working tunnel, and nodes and DCs rate-limit directions)
  relay_rtt_overhead_ms  ping RTT over a relayed tunnel minus over a direct one

usage: python bench/tunnel.py [--seconds 2.5] [--payload 1200] [--quick]
`--quick`: one round of 0.3 s, 3 handshakes, 2 requesters × 2 peers per DC: the same code paths
(make test).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ntm import keys  # noqa: E402
from node.endpoint import Endpoint  # noqa: E402

WINDOW = 64
LOSS_WAIT = 0.05


class _Counter(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        self.target = 0
        self.event = asyncio.Event()

    def datagram_received(self, data: bytes, addr) -> None:
        self.count += 1
        self.bytes += len(data)
        if self.count >= self.target:
            self.event.set()


async def _pump(send, counter, payload: bytes, seconds: float) -> tuple[float, int, int]:
    start = time.perf_counter()
    deadline = start + seconds
    sent = 0
    while time.perf_counter() < deadline:
        counter.event.clear()
        counter.target = counter.count + WINDOW
        for _ in range(WINDOW):
            send(payload)
        sent += WINDOW
        if counter.count < counter.target:
            try:
                await asyncio.wait_for(counter.event.wait(), LOSS_WAIT)
            except (asyncio.TimeoutError, TimeoutError):
                pass  # lost datagrams are simply not counted
    elapsed = time.perf_counter() - start
    return elapsed, counter.count, sent


async def bench_udp(payload: bytes, seconds: float) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    rx = _Counter()
    rtr, _ = await loop.create_datagram_endpoint(lambda: rx, local_addr=("127.0.0.1", 0))
    dest = rtr.get_extra_info("sockname")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.setblocking(False)
    ttr, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
    send = ttr.sendto
    elapsed, got, _ = await _pump(lambda p: send(p, dest), rx, payload, seconds)
    rx_bytes = rx.bytes
    ttr.close()
    rtr.close()
    return rx_bytes * 8 / elapsed / 1e6, got / elapsed


async def _pair(ka, kb, ea: Endpoint, eb: Endpoint):
    pid = os.urandom(8)
    pa, pb = keys.public_bytes(ka), keys.public_bytes(kb)
    port = eb.local_addr[1]
    t0 = time.perf_counter()
    cb, ca = await asyncio.gather(
        eb.open(pid, keys.node_id(pa), pa, role="wait"),
        ea.open(pid, keys.node_id(pb), pb, candidates=[("127.0.0.1", port)]),
    )
    return time.perf_counter() - t0, ca, cb


async def bench_tunnel(payload: bytes, seconds: float, handshakes: int = 30) -> tuple[float, float, float]:
    ka, kb = keys.generate(), keys.generate()
    ea = await Endpoint.create(ka, port=0)
    eb = await Endpoint.create(kb, "127.0.0.1", port=0)
    times = []
    for _ in range(handshakes):
        dt, ca, cb = await _pair(ka, kb, ea, eb)
        times.append(dt)
        await ca.close()
        await cb.close()
    _, ca, cb = await _pair(ka, kb, ea, eb)
    rx = _Counter()

    def on_data(data: bytes) -> None:
        rx.count += 1
        rx.bytes += len(data)
        if rx.count >= rx.target:
            rx.event.set()

    cb.set_receiver(on_data)
    elapsed, got, _ = await _pump(ca.send_nowait, rx, payload, seconds)
    drops = {k: v for k, v in cb.stats.items() if k.startswith("drop_") and v}
    if drops:
        print(f"# receiver drops: {drops}", file=sys.stderr)
    await ea.close()
    await eb.close()
    return rx.bytes * 8 / elapsed / 1e6, got / elapsed, statistics.median(times) * 1000


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating UDP/tunnel rounds; medians reported")
    ap.add_argument("--payload", type=int, default=1200)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 0.3, 1
    handshakes, requesters, peers = (3, 2, 2) if args.quick else (30, REQUESTERS, PEERS)
    payload = os.urandom(args.payload)
    udp, tun = [], []
    for _ in range(args.rounds):  # alternate, so load from other processes hits both alike
        udp.append(await bench_udp(payload, args.seconds))
        tun.append(await bench_tunnel(payload, args.seconds, handshakes))
    med = statistics.median
    udp_mbps, udp_pps = med(u[0] for u in udp), med(u[1] for u in udp)
    tun_mbps, tun_pps, hs_ms = med(t[0] for t in tun), med(t[1] for t in tun), med(t[2] for t in tun)
    ratios = [t[0] / u[0] for u, t in zip(udp, tun)]
    print(f"payload_bytes: {args.payload}")
    print(f"udp_goodput_mbps: {udp_mbps:.1f}")
    print(f"udp_pps: {udp_pps:.0f}")
    print(f"tunnel_goodput_mbps: {tun_mbps:.1f}")
    print(f"tunnel_pps: {tun_pps:.0f}")
    print(f"tunnel_goodput_ratio_vs_udp: {med(ratios):.3f}")
    print(f"# goodput ratio per round: {' '.join(f'{r:.3f}' for r in ratios)}", file=sys.stderr)
    print(f"handshake_ms_p50: {hs_ms:.2f}")
    for name, value in (await bench_signaling(requesters, peers)).items():
        print(f"{name}: {value:.2f}")


# Requesters at DC1 × peers at each DC: every sample is the first tunnel of its own pair, so no
# requester sends its DC more than its burst of Direction Requests (5 + 5 + 1 of 20) and no peer
# is directed more than its per-peer burst (6 + 1 of 8): the bench measures setup, not the limits.
REQUESTERS, PEERS = 6, 5


async def bench_signaling(n_requesters: int = REQUESTERS, n_peers: int = PEERS) -> dict[str, float]:
    """Direction Request → first decrypted byte, through real DCs; and the relay's RTT cost."""
    import itertools

    from node.agent import Node
    from labkit.dcnet import node_federation

    async with node_federation(Node) as (net, start):
        home = [net.urls[0]] * (n_requesters + n_peers) + [net.urls[1]] * n_peers
        started = await asyncio.gather(*(start(url) for url in home))
        requesters, same_dc, cross_dc = (
            started[:n_requesters],
            started[n_requesters : n_requesters + n_peers],
            started[n_requesters + n_peers :],
        )

        async def first_byte(a: Node, peer: Node, force_relay: bool = False) -> float:
            t0 = time.perf_counter()
            tunnel = await a.connect(peer.id, force_relay=force_relay)
            await tunnel.channel.send(b"x")
            incoming = await peer.accept()
            await incoming.channel.recv()
            return (time.perf_counter() - t0) * 1000, tunnel

        same = [(await first_byte(a, p))[0] for a, p in itertools.product(requesters, same_dc)]
        cross = [(await first_byte(a, p))[0] for a, p in itertools.product(requesters, cross_dc)]
        a, b = requesters[0], cross_dc[0]
        direct = await a.connect(b.id)  # the working tunnel of the first cross-DC sample
        _, relayed = await first_byte(a, b, force_relay=True)
        rtt_direct = statistics.median([await direct.channel.ping() for _ in range(20)]) * 1000
        rtt_relay = statistics.median([await relayed.channel.ping() for _ in range(20)]) * 1000
    return {
        "signal_same_dc_p50_ms": statistics.median(same),
        "signal_cross_dc_p50_ms": statistics.median(cross),
        "signal_cross_dc_p95_ms": statistics.quantiles(cross, n=20)[18],
        "relay_rtt_overhead_ms": rtt_relay - rtt_direct,
    }


if __name__ == "__main__":
    asyncio.run(main())

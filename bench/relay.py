"""Relay benchmark; prints `metric: value` lines.

  table_ops_per_s       RelayTable.on_datagram forwarding decisions per second (in process, no I/O)
  relay_goodput_mbps    payload delivered A -> real `python -m rs` process -> B over loopback UDP,
                        windows of WINDOW datagrams (next window when the previous arrived or
                        after LOSS_WAIT), IPv4 sender to IPv6 receiver through the dual-stack socket
  relay_pps             datagrams per second delivered in the same run
  direction_ms_p50      POST /v1/relay-directions round trip over the pinned TLS channel (signature + cached trust check)

usage: python bench/relay.py [--seconds 2.5] [--payload 1200] [--quick]
`--quick`: 0.3 s per measurement and 5 directions: the same code paths (make test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from ntm import envelope, keys, messages, packet  # noqa: E402
from chain.registry import Registry  # noqa: E402
from dc.federation import FederationClient  # noqa: E402
from rs.relay import RelayTable  # noqa: E402
from scripts.anvil import DEV_KEYS, Anvil  # noqa: E402
from scripts.procs import rs_child  # noqa: E402

WINDOW = 64
LOSS_WAIT = 0.05


def bind_side(exchange: Callable[[bytes], bytes], path: bytes, token: bytes, side: int) -> None:
    """Bind one side of a path as a node does (§8.2): a bind that gets the address's cookie, then
    one that carries it. `exchange` sends a datagram to the relay and returns its answer."""
    key = packet.relay_side_key(token, side)
    ack = packet.RelayBindAck.parse(exchange(packet.RelayBind.make(path, side, 1, packet.NO_COOKIE, key).encode()))
    ack = packet.RelayBindAck.parse(exchange(packet.RelayBind.make(path, side, 2, ack.cookie, key).encode()))
    if not ack.bound:
        raise RuntimeError(f"the relay did not bind side {side}")


def table_ops(seconds: float) -> float:
    t = RelayTable()
    path, token = os.urandom(8), os.urandom(32)
    t.add_path(path, token, 1e9, 1 << 60, 0.0)
    a, b = ("192.0.2.1", 1), ("2001:db8::1", 2)
    for side, addr in ((0, a), (1, b)):
        bind_side(lambda d, addr=addr: t.on_datagram(d, addr, 0.0)[0][0], path, token, side)
    dgram = bytes([packet.TYPE_DATA]) + path + os.urandom(1200)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10_000):
            t.on_datagram(dgram, a, 1.0)
        n += 10_000
    return n / (time.perf_counter() - start)


async def through_process(seconds: float, payload: int, directions: int = 50) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, Anvil() as chain:
        owner = await Registry.deploy(chain.url, DEV_KEYS[0])
        dc_key = keys.private_key(DEV_KEYS[1])
        await owner.admit_dc(keys.node_id_of(dc_key), "dc1", "http://127.0.0.1:1")
        dep = Path(tmp) / "deployment.json"
        dep.write_text(json.dumps({"chain_id": owner.chain_id, "registry": keys.checksum(owner.address)}))
        await owner.close()
        rs = rs_child(chain.url, dep, Path(tmp)).start()
        try:
            port = rs.ready["udp_port"]
            nodes = [keys.node_id_of(keys.generate()) for _ in range(2)]
            times = []
            ids = [keys.checksum(n) for n in nodes]

            def direction(path: bytes, token: bytes) -> messages.RelayDirection:
                return messages.RelayDirection(
                    path.hex(), token.hex(), ids, time.time_ns() // 1_000_000 + 600_000, 1 << 40
                )

            async with aiohttp.ClientSession() as http:
                fed = FederationClient(dc_key, lambda _a: True, envelope.ReplayGuard(), http=http)
                for _ in range(directions):
                    t0 = time.perf_counter()
                    await fed.book_relay(rs.ready["control"], direction(os.urandom(8), os.urandom(32)))
                    times.append((time.perf_counter() - t0) * 1000)
                path, token = os.urandom(8), os.urandom(32)
                await fed.book_relay(rs.ready["control"], direction(path, token))
            out["direction_ms_p50"] = statistics.median(times[1:])
            a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            a.bind(("127.0.0.1", 0))
            b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            b.bind(("::1", 0))
            b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            for s, side, dst in ((a, 0, ("127.0.0.1", port)), (b, 1, ("::1", port))):
                s.settimeout(2)
                bind_side(lambda d, s=s, dst=dst: (s.sendto(d, dst), s.recv(100))[1], path, token, side)
            dgram = bytes([packet.TYPE_DATA]) + path + os.urandom(payload)
            b.settimeout(LOSS_WAIT)
            got = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                for _ in range(WINDOW):
                    a.sendto(dgram, ("127.0.0.1", port))
                for _ in range(WINDOW):
                    try:
                        b.recv(payload + 100)
                        got += 1
                    except (socket.timeout, TimeoutError):
                        break
            elapsed = time.perf_counter() - start
            out["relay_pps"] = got / elapsed
            out["relay_goodput_mbps"] = got * payload * 8 / elapsed / 1e6
            a.close()
            b.close()
        finally:
            rs.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.5)
    ap.add_argument("--payload", type=int, default=1200)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    args = ap.parse_args()
    seconds, directions = (0.3, 5) if args.quick else (args.seconds, 50)
    print(f"table_ops_per_s: {table_ops(min(seconds, 1.0)):.0f}")
    for k, v in asyncio.run(through_process(seconds, args.payload, directions)).items():
        print(f"{k}: {v:.2f}")


if __name__ == "__main__":
    main()

"""Relay benchmark; prints `metric: value` lines.

  table_ops_per_s       RelayTable.on_datagram forwarding decisions per second (in process, no I/O)
  relay_goodput_mbps    payload delivered A -> real `python -m rs` process -> B over loopback UDP,
                        windows of WINDOW datagrams sent in GSO bursts as a node sends them (next
                        window when the previous arrived or after LOSS_WAIT), IPv4 sender to IPv6
                        receiver through the dual-stack socket
  relay_pps             datagrams per second delivered in the same run
  relay_cpu_s_per_gb    the relay process's CPU seconds per GB it forwarded
  relay_pps_per_cpu_s   datagrams forwarded per CPU second of the relay: what one core of it carries
  relay_stranger_cpu_us the relay's CPU microseconds per datagram of a stranger's spray (unknown path)
  *_no_offload          the same for a relay started with --no-udp-offload, in interleaved rounds
  *_baseline            the same for the relay of the checkout --baseline (with --modes ...,baseline)
  relay_offload_pps_ratio  relay_pps / relay_pps_no_offload
  direction_ms_p50      POST /v1/relay-directions round trip over the pinned TLS channel (signature + cached trust check)

usage: python bench/relay.py [--seconds 2.5] [--payload 1200] [--modes offload,no_offload] [--baseline DIR] [--quick]
`--quick`: 0.3 s per measurement, one round and 5 directions: the same code paths (make test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from daemon import udpgso  # noqa: E402
from labkit.dcnet import raw_http  # noqa: E402
from ntm import envelope, keys, messages, packet  # noqa: E402
from chain.registry import Registry  # noqa: E402
from dc.federation import FederationClient  # noqa: E402
from rs.relay import RelayTable  # noqa: E402
from scripts.anvil import DEV_KEYS, Anvil  # noqa: E402
from scripts.procs import Child  # noqa: E402

WINDOW = 64  # datagrams in flight: what a node's GSO sends of a TCP window put on the path
GSO_BURST = 32  # datagrams per GSO send (32 x 1209 bytes fits one 64 KiB send)
LOSS_WAIT = 0.05
STRANGER_BURST = 32  # stranger datagrams between 1 ms pauses: paced so the relay reads them all
STRANGER_DATAGRAMS = {False: 20_000, True: 2_000}  # by --quick
# The relay's modes, by its flags: UDP GRO/GSO where the kernel has them (the default), or not.
MODES = {"offload": [], "no_offload": ["--no-udp-offload"]}
ROUNDS = 5  # interleaved rounds per mode


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


def cpu_s(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_relay(chain: Anvil, dep: Path, tmp: str, mode: str, baseline: str | None) -> Child:
    """The relay of `mode`; "baseline" is the default relay of the checkout at `baseline`."""
    args = [
        "--rpc-url",
        chain.url,
        "--deployment",
        str(dep),
        "--udp-port",
        "0",
        "--http-port",
        "0",
        "--stream-port",
        "0",
    ]
    prefix = ["env", "-C", baseline] if mode == "baseline" else None  # `python -m rs` from that tree
    log = Path(tmp) / f"rs-{mode}.log"
    return Child("rs", [*args, "--data-dir", f"{tmp}/{mode}", *MODES.get(mode, [])], log, prefix=prefix).start()


class Pair:
    """Node A (IPv4) and node B (IPv6) on one booked path of one relay, both sides bound."""

    def __init__(self, rs: Child, path: bytes, token: bytes) -> None:
        self.rs, self.path = rs, path
        self.dst = ("127.0.0.1", rs.ready["udp_port"])
        self.a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.a.bind(("127.0.0.1", 0))
        self.b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.b.bind(("::1", 0))
        self.b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        for s, side, dst in ((self.a, 0, self.dst), (self.b, 1, ("::1", self.dst[1]))):
            s.settimeout(2)
            bind_side(lambda d, s=s, dst=dst: (s.sendto(d, dst), s.recv(100))[1], path, token, side)
        udpgso.enable_gro(self.b)  # B reads the relay's GSO sends whole, as a node does
        self.b.settimeout(LOSS_WAIT)
        self.buf = bytearray(udpgso.RECV_BUFFER)

    def blast(self, seconds: float, payload: int) -> tuple[int, float, float]:
        """Windows of WINDOW datagrams A -> relay -> B, sent in GSO bursts as a node sends them:
        (datagrams delivered, wall seconds, relay CPU seconds)."""
        dgram = bytes([packet.TYPE_DATA]) + self.path + os.urandom(payload)
        burst = dgram * GSO_BURST
        got, cpu0, start = 0, cpu_s(self.rs.pid), time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(WINDOW // GSO_BURST):
                udpgso.send_gso(self.a, [burst], len(dgram), self.dst)
            want = got + WINDOW
            while got < want:
                try:
                    n, anc, _f, _a = self.b.recvmsg_into([self.buf], udpgso.GRO_CMSG_SPACE)
                except (socket.timeout, TimeoutError):
                    break
                seg = udpgso.gro_segment(anc) or n
                got += -(-n // seg)
        return got, time.perf_counter() - start, cpu_s(self.rs.pid) - cpu0

    async def stranger(self, count: int) -> float:
        """A stranger sprays `count` datagrams of a path that does not exist, one send each:
        the relay's CPU microseconds per datagram it read (from its own udp_received counter)."""
        junk = bytes([packet.TYPE_DATA]) + os.urandom(8) + os.urandom(1200)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        received0, cpu0 = await self.received(), cpu_s(self.rs.pid)
        for i in range(count):
            s.sendto(junk, self.dst)
            if i % STRANGER_BURST == 0:
                await asyncio.sleep(0.001)  # paced: what the relay reads, not what its buffer drops
        await asyncio.sleep(0.1)
        received, cpu = await self.received() - received0, cpu_s(self.rs.pid) - cpu0
        s.close()
        return cpu / max(received, 1) * 1e6

    async def received(self) -> int:
        async with raw_http() as http, http.get(self.rs.ready["http"] + "/metrics") as r:
            text = await r.text()
        return int(float(re.search(r"^ntm_rs_udp_received_total (\S+)$", text, re.M).group(1)))

    def close(self) -> None:
        self.a.close()
        self.b.close()


async def through_process(
    seconds: float, payload: int, directions: int, modes: list[str], rounds: int, baseline: str | None = None
) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, Anvil() as chain:
        owner = await Registry.deploy(chain.url, DEV_KEYS[0])
        dc_key = keys.private_key(DEV_KEYS[1])
        await owner.admit_dc(keys.node_id_of(dc_key), "dc1", "http://127.0.0.1:1")
        dep = Path(tmp) / "deployment.json"
        dep.write_text(json.dumps({"chain_id": owner.chain_id, "registry": keys.checksum(owner.address)}))
        await owner.close()
        relays = {mode: start_relay(chain, dep, tmp, mode, baseline) for mode in modes}
        pairs: dict[str, Pair] = {}
        try:
            ids = [keys.checksum(keys.node_id_of(keys.generate())) for _ in range(2)]
            times = []

            def direction(path: bytes, token: bytes) -> messages.RelayDirection:
                return messages.RelayDirection(
                    path.hex(), token.hex(), ids, time.time_ns() // 1_000_000 + 600_000, 1 << 40
                )

            async with aiohttp.ClientSession() as http:
                fed = FederationClient(dc_key, lambda _a: True, envelope.ReplayGuard(), http=http)
                first = relays[modes[0]].ready["control"]
                for _ in range(directions):
                    t0 = time.perf_counter()
                    await fed.book_relay(first, direction(os.urandom(8), os.urandom(32)))
                    times.append((time.perf_counter() - t0) * 1000)
                for mode, rs in relays.items():
                    path, token = os.urandom(8), os.urandom(32)
                    await fed.book_relay(rs.ready["control"], direction(path, token))
                    pairs[mode] = Pair(rs, path, token)
            out["direction_ms_p50"] = statistics.median(times[1:])
            totals = {mode: [0, 0.0, 0.0] for mode in modes}
            for _ in range(rounds):  # interleaved: the machine's load drifts alike for every mode
                for mode in modes:
                    for i, v in enumerate(pairs[mode].blast(seconds / rounds, payload)):
                        totals[mode][i] += v
            for mode in modes:
                got, elapsed, cpu = totals[mode]
                suffix = "" if mode == "offload" else f"_{mode}"
                out[f"relay_pps{suffix}"] = got / elapsed
                out[f"relay_goodput_mbps{suffix}"] = got * payload * 8 / elapsed / 1e6
                out[f"relay_cpu_s_per_gb{suffix}"] = cpu / max(got * (payload + packet.PREFIX_LEN), 1) * 1e9
                out[f"relay_pps_per_cpu_s{suffix}"] = got / max(cpu, 1e-9)  # what one core of relay carries
                out[f"relay_stranger_cpu_us{suffix}"] = await pairs[mode].stranger(STRANGER_DATAGRAMS[seconds < 1])
            if "no_offload" in modes:
                out["relay_offload_pps_ratio"] = out["relay_pps"] / max(out["relay_pps_no_offload"], 1e-9)
        finally:
            for pair in pairs.values():
                pair.close()
            for rs in relays.values():
                rs.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.5)
    ap.add_argument("--payload", type=int, default=1200)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    ap.add_argument(
        "--modes",
        default=",".join(MODES),
        help="relay modes to run, interleaved: offload (the default flags), no_offload, baseline (needs --baseline)",
    )
    ap.add_argument("--baseline", help="a checkout of an older relay (e.g. `git archive main`), run as mode baseline")
    args = ap.parse_args()
    seconds, directions, rounds = (0.3, 5, 1) if args.quick else (args.seconds, 50, ROUNDS)
    print(f"table_ops_per_s: {table_ops(min(seconds, 1.0)):.0f}")
    modes = args.modes.split(",")
    for k, v in asyncio.run(through_process(seconds, args.payload, directions, modes, rounds, args.baseline)).items():
        print(f"{k}: {v:.2f}")


if __name__ == "__main__":
    main()

"""A DC that carries a city (issue 30): real anvil, two real `ntm-dc` processes and one relay,
the load driven from this separate process. Prints `metric: value`:

  records                       node records on chain (node-signed, in registerBatch transactions by a
                                seeding DC) before the DCs start
  chain_ready_s                 until anvil holds them: seeding them (~60 s for 100k at load ~19) the
                                first time, then loading the cached chain (labkit/seed.py seeded_chain)
  dc_import_s                   a Python process importing the DC, for scale: part of every start below
  cold_start_s_100k             a DC with an empty database: process start → ready line (every record read)
  cold_start_s_100k_snapshot    the same DC restarted after a clean stop: from its registry snapshot
  cold_start_cpu_s_100k(_snapshot) the CPU seconds the DC used for either start, whatever else loads
                                the machine (wall time on 2 busy cores is several times this). From
                                a snapshot at 100k, ~1.8 s: ~0.8 imports (py_ecc, pulled in by
                                eth_account, ~0.4), ~0.7 the keystore's scrypt, ~0.2 the registry
  dc_rss_mb_100k                its resident memory once caught up
  dashboard_ms_100k             GET /v1/dashboard, p50 of DASHBOARD_SAMPLES (metrics_ms_100k: /metrics);
                                dashboard_cpu_ms_100k, metrics_cpu_ms_100k: the DC's CPU ms per request
  registrations_per_s_100k      REGISTRATIONS fresh nodes POSTed to one DC (200 in flight), until
                                all are confirmed on chain (its outbox empty); registration_cpu_ms_100k:
                                the DC's CPU ms per registration, until confirmed
  sessions_rss_kb_each          the DC's RSS growth per node session (WebSocket + keepalives), over
                                REGISTRATIONS sessions
  directions_per_s_64           Direction Requests answered per second with IN_FLIGHT in flight, from
                                requesters at DC 1 to peers at DC 2 (each push acknowledged as nodes do)
  direction_p99_ms_64           their latency, request sent → result, p99 (p50 printed too)
  direction_cpu_ms_requester_dc CPU time the requester's DC spent per direction (and the peer's
                                DC: _peer_dc, the relay: _relay, the chain the DCs poll: _anvil, this
                                load generator: _load): the capacity of one core whatever else loads
                                the machine
  registrations_per_s_2s_blocks full mode only: BLOCK_REGISTRATIONS fresh nodes at a DC on a chain
                                making a block every BLOCK_TIME_S (as QBFT), until all are confirmed:
                                what the pipelined outbox carries per block (one transaction at a
                                time capped it at 200 records a block, 100/s)

The chain with RECORDS records is built once per machine (contract bytecode, anvil version, record
count) and cached outside the repository: the records stay real blocks and logs that every DC reads
from the chain as in production. `--records N` runs at any size.
`--quick`: 2,000 records, 40 nodes, 200 directions: the same code paths (make test).
`--directions`: only the direction load at full size on 2,000 records (profiling, A/B); with
NTM_SCALE_SPY=DIR, py-spy samples the DCs and the relay meanwhile (collapsed stacks in DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import service  # noqa: E402
from node.dc_client import DcClient  # noqa: E402
from ntm import keepalive, keys, messages  # noqa: E402
from ntm.record import Domain, NodeTransaction  # noqa: E402
from ntm.registration import RegistrationRequest  # noqa: E402
from scripts.anvil import Anvil  # noqa: E402
from labkit.dcnet import DcNet, raw_http  # noqa: E402
from labkit.seed import seeded_chain  # noqa: E402
from labkit.load import read_metric  # noqa: E402

RECORDS = 100_000
# At DC 1: the registration rate, then one session each (RSS per session, requesters). Each requester
# asks at most RATE_PER_NODE a second, so they can ask 4,000/s in all: the DCs set the rate measured,
# not the requesters' rate limit (1,000 capped the bench itself at 2,000/s, the target).
REGISTRATIONS = 2000
PEERS = 64  # at DC 2: the directions' targets
IN_FLIGHT = 64
DIRECTIONS_S = 8.0
DASHBOARD_SAMPLES = 50
REGISTER_CONCURRENCY = 200
START_TIMEOUT_S = 120.0  # a DC's ready line comes once it has read every record
SESSIONS_AT_ONCE = 25  # handshakes at a time: a crowd arriving, not a stampede
SESSIONS_PER_CLIENT = 100
SESSION_OPEN_TIMEOUT_S = 30.0  # this machine runs other tests too (load average 10-20 seen)
BLOCK_TIME_S = 2
BLOCK_REGISTRATIONS = 2000
RATE_PER_NODE = 2.0  # dc/signaling.DIRECTIONS_PER_NODE: requesters are picked so none is rate-limited
EXTRA_DC_FLAGS = ("--new-nodes-per-hour", "1e9")  # the rate is measured, not the gas budget
DIRECTIONS_RECORDS = 2000  # --directions: the registry's size does not enter a direction's cost


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used: /proc/PID/stat fields 14 and 15."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1] if len(values) > 1 else values[0]


async def timed(call) -> float:
    start = time.perf_counter()
    await asyncio.to_thread(call)
    return time.perf_counter() - start


def import_dc() -> None:
    """What every start pays before reading any record: a Python process importing the DC."""
    subprocess.run([sys.executable, "-c", "import dc.__main__"], cwd=ROOT, check=True)


async def register(http: aiohttp.ClientSession, url: str, n: int) -> tuple[list, float]:
    """`n` fresh nodes registered at `url` (not waiting for the chain); (keys, s until all confirmed)."""
    async with http.get(url + "/v1/info") as r:
        info = messages.decode(messages.DcInfoReply, await r.read())
    domain, dc, now = (
        Domain(info.chain_id, keys.parse_node_id(info.registry)),
        keys.parse_node_id(info.dc),
        int(time.time() * 1000),
    )
    node_keys = [keys.generate() for _ in range(n)]
    bodies = []
    for k in node_keys:
        rec = NodeTransaction(keys.node_id_of(k), dc, now)
        bodies.append(
            RegistrationRequest(rec, keys.sign_digest(k, rec.digest(domain)), keys.public_bytes(k), ()).to_json()
        )
    gate = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def post(body: dict) -> None:
        async with gate, http.post(url + "/v1/register", json=body) as r:
            assert r.status == 200, await r.text()

    start = time.perf_counter()
    await asyncio.gather(*(post(b) for b in bodies))
    while await read_metric(url, "ntm_dc_outbox_pending") > 0:
        await asyncio.sleep(0.05)
    return node_keys, time.perf_counter() - start


class LoadNode:
    """A node as the DC sees it: a session, keepalives from its own UDP socket, and an ack for
    each pushed direction. Its Direction Requests are answered through `results`."""

    def __init__(self, key) -> None:
        self.key, self.id = key, keys.node_id_of(key)
        self.ids = itertools.count(1)
        self.results: dict[int, asyncio.Future] = {}

    async def open(self, dc: DcClient) -> None:
        loop = asyncio.get_running_loop()
        self.udp, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        local = f"127.0.0.1:{self.udp.get_extra_info('sockname')[1]}"
        self.ws, welcome = await dc.open_session(self.key, [local])
        for seq, port in enumerate(welcome.keepalive_ports, 1):
            self.udp.sendto(keepalive.encode_request(self.id, seq, bytes.fromhex(welcome.token)), ("127.0.0.1", port))
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            m = messages.decode(messages.DcToNode, msg.data)
            if isinstance(m, messages.DirectionPush):  # as a peer: accept every direction
                await self.ws.send_str(messages.dumps(messages.DirectionAck(m.direction.body["path"])))
            elif isinstance(m, messages.DirectionResult) and m.id in self.results:
                self.results.pop(m.id).set_result(m)

    async def direction(self, peer: bytes) -> messages.DirectionResult:
        rid = next(self.ids)
        fut = self.results[rid] = asyncio.get_running_loop().create_future()
        await self.ws.send_str(messages.dumps(messages.DirectionRequest(rid, keys.checksum(peer), inline=True)))
        return await asyncio.wait_for(fut, 10)

    async def close(self) -> None:
        self.reader.cancel()
        await self.ws.close()
        self.udp.close()


async def sessions(url: str, node_keys: list) -> tuple[list[LoadNode], list[DcClient]]:
    """A session for each key; the clients to close after the nodes (one per SESSIONS_PER_CLIENT:
    aiohttp holds at most 100 connections per client, and each session keeps one)."""
    nodes = [LoadNode(k) for k in node_keys]
    clients = [DcClient(url, timeout=SESSION_OPEN_TIMEOUT_S) for _ in range(0, len(nodes), SESSIONS_PER_CLIENT)]
    for i in range(0, len(nodes), SESSIONS_AT_ONCE):
        await asyncio.gather(
            *(n.open(clients[(i + j) // SESSIONS_PER_CLIENT]) for j, n in enumerate(nodes[i : i + SESSIONS_AT_ONCE]))
        )
    return nodes, clients


async def directions(
    requesters: list[LoadNode], peers: list[LoadNode], duration: float, limit: int
) -> tuple[float, list[float], dict[str, int]]:
    """IN_FLIGHT workers send Direction Requests for `duration` s (or `limit` in all); each
    requester asks at most RATE_PER_NODE per second. (rate, latencies ms, outcome counts)."""
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    ready = asyncio.Queue()
    for r in requesters:
        ready.put_nowait(r)
    start = time.perf_counter()
    end = start + duration
    sent = itertools.count()

    async def worker() -> None:
        while time.perf_counter() < end and next(sent) < limit:
            node = await ready.get()
            t0 = time.perf_counter()
            res = await node.direction(random.choice(peers).id)
            latencies.append((time.perf_counter() - t0) * 1000)
            key = "ok" if res.direction is not None else res.error.error
            outcomes[key] = outcomes.get(key, 0) + 1
            asyncio.get_running_loop().call_later(
                max(0.0, 1 / RATE_PER_NODE - (time.perf_counter() - t0)), ready.put_nowait, node
            )

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return len(latencies) / (time.perf_counter() - start), latencies, outcomes


async def operator_views(net: DcNet, registrations: int) -> None:
    """Cold starts (empty database, then the snapshot), the operator endpoints and the registration
    rate at DC 1: everything but the directions."""

    def start(i: int) -> None:
        net.start_dc(i, EXTRA_DC_FLAGS, timeout=START_TIMEOUT_S)

    print(f"cold_start_s_100k: {await timed(lambda: start(0)):.2f}")
    print(f"cold_start_cpu_s_100k: {cpu_s(net.dcs[0].pid):.2f}")
    print(f"dc_rss_mb_100k: {rss_kb(net.dcs[0].pid) / 1024:.0f}")
    net.dcs[0].stop()  # clean: it writes its snapshot
    print(f"cold_start_s_100k_snapshot: {await timed(lambda: start(0)):.2f}")
    print(f"cold_start_cpu_s_100k_snapshot: {cpu_s(net.dcs[0].pid):.2f}")
    async with raw_http() as http:
        for path, name in (("/v1/dashboard", "dashboard_ms_100k"), ("/metrics", "metrics_ms_100k")):
            ms, cpu_before = [], cpu_s(net.dcs[0].pid)
            for _ in range(DASHBOARD_SAMPLES):
                t0 = time.perf_counter()
                async with http.get(net.urls[0] + path) as r:
                    assert r.status == 200
                    await r.read()
                ms.append((time.perf_counter() - t0) * 1000)
            print(f"{name}: {statistics.median(ms):.1f}")
            cpu_ms = (cpu_s(net.dcs[0].pid) - cpu_before) * 1000 / DASHBOARD_SAMPLES
            print(f"{name.replace('_ms_', '_cpu_ms_')}: {cpu_ms:.1f}")


@contextlib.contextmanager
def spied(pids: dict[str, int], out: Path | None):
    """With `out` (NTM_SCALE_SPY=dir): py-spy (NTM_PY_SPY, default /tmp/spy/bin/py-spy) samples
    each Python process while the block runs, collapsed stacks in out/NAME.txt (profiling)."""
    if out is None:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    spy = os.environ.get("NTM_PY_SPY", "/tmp/spy/bin/py-spy")
    procs = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "250",
                "--nonblocking",
                "--output",
                str(out / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    time.sleep(1.0)  # attached before the load starts
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait(timeout=30)


async def direction_load(net: DcNet, requester_keys: list, peers: int, duration: float, limit: int) -> None:
    """Sessions (their memory at DC 1), then Direction Requests from DC 1's nodes to DC 2's: rate,
    latency, and the CPU each process spent per direction."""
    async with raw_http() as http:
        peer_keys, _ = await register(http, net.urls[1], peers)
    pid = net.dcs[0].pid
    await asyncio.sleep(0.5)
    before = rss_kb(pid)
    requesters, dc1 = await sessions(net.urls[0], requester_keys)
    await asyncio.sleep(0.5)
    print(f"sessions_rss_kb_each: {(rss_kb(pid) - before) / len(requesters):.1f}")
    targets, dc2 = await sessions(net.urls[1], peer_keys)
    await asyncio.sleep(0.3)  # keepalives seen: both ends have observed addresses
    pids = {
        **{"requester_dc": net.dcs[0].pid, "peer_dc": net.dcs[1].pid, "relay": net.rs.pid},
        **{"anvil": net.chain.pid, "load": os.getpid()},
    }
    spy = os.environ.get("NTM_SCALE_SPY")
    service.settle_heap()  # the load generator collects as the daemons do: its CPU is not the DCs' to lose
    try:
        with spied({k: v for k, v in pids.items() if k not in ("anvil", "load")}, Path(spy) if spy else None):
            cpu_before = {name: cpu_s(p) for name, p in pids.items()}
            rate, ms, outcomes = await directions(requesters, targets, duration, limit)
            cpu = {name: cpu_s(p) - cpu_before[name] for name, p in pids.items()}
    finally:
        for n in requesters + targets:
            await n.close()
        for client in dc1 + dc2:
            await client.close()
    assert outcomes.get("ok", 0) == sum(outcomes.values()), outcomes
    print(f"directions_per_s_64: {rate:.0f}")
    print(f"direction_p50_ms_64: {statistics.median(ms):.1f}")
    print(f"direction_p99_ms_64: {pct(ms, 99):.1f}")
    for name, used in cpu.items():
        print(f"direction_cpu_ms_{name}: {used * 1000 / len(ms):.2f}")


async def run(
    tmp: Path, records: int, registrations: int, peers: int, duration: float, limit: int, everything: bool = True
) -> None:
    """`everything`: cold starts, operator views and registrations before the directions (else
    only the directions: profiling, A/B)."""
    logging.getLogger("ntm.node").setLevel(logging.ERROR)
    start = time.perf_counter()
    async with seeded_chain(records) as (chain, registry):
        print(f"records: {records}")
        print(f"chain_ready_s: {time.perf_counter() - start:.1f}")
        net = DcNet(tmp, chain)
        await net.deploy(2, registry)
        if everything:
            print(f"dc_import_s: {await timed(import_dc):.2f}")
        await asyncio.to_thread(net.start_rs)
        try:
            await asyncio.to_thread(net.start_dc, 1, EXTRA_DC_FLAGS, START_TIMEOUT_S)
            if everything:
                await operator_views(net, registrations)
            else:
                await asyncio.to_thread(net.start_dc, 0, EXTRA_DC_FLAGS, START_TIMEOUT_S)
            async with raw_http() as http:
                cpu_before = cpu_s(net.dcs[0].pid)
                requester_keys, took = await register(http, net.urls[0], registrations)
            if everything:
                print(f"registrations_per_s_100k: {registrations / took:.0f}")
                cpu_ms = (cpu_s(net.dcs[0].pid) - cpu_before) * 1000 / registrations
                print(f"registration_cpu_ms_100k: {cpu_ms:.2f}")
            await direction_load(net, requester_keys, peers, duration, limit)
        finally:
            await asyncio.to_thread(net.stop)


async def registrations_on_slow_blocks(tmp: Path, n: int) -> float:
    """Registrations per second at one DC, all confirmed, on a chain with BLOCK_TIME_S blocks."""
    with Anvil(block_time=BLOCK_TIME_S) as chain:
        net = DcNet(tmp / "blocks", chain)
        await net.deploy(1)
        try:
            await asyncio.to_thread(net.start_dc, 0, ("--new-nodes-per-hour", "1e9"), START_TIMEOUT_S)
            async with raw_http() as http:
                _, took = await register(http, net.urls[0], n)
            return n / took
        finally:
            await asyncio.to_thread(net.stop)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, same code paths (CI)")
    p.add_argument("--records", type=int, help=f"records seeded on chain (default {RECORDS})")
    p.add_argument("--directions", action="store_true", help="only the direction load, full size (profiling, A/B)")
    args = p.parse_args()
    if args.quick:
        sizes = (args.records or 2000, 40, 8, 5.0, 200)
    elif args.directions:
        sizes = (args.records or DIRECTIONS_RECORDS, REGISTRATIONS, PEERS, DIRECTIONS_S, 10**9)
    else:
        sizes = (args.records or RECORDS, REGISTRATIONS, PEERS, DIRECTIONS_S, 10**9)
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp), *sizes, everything=not args.directions))
        if not (args.quick or args.directions):
            rate = asyncio.run(registrations_on_slow_blocks(Path(tmp), BLOCK_REGISTRATIONS))
            print(f"registrations_per_s_{BLOCK_TIME_S}s_blocks: {rate:.0f}")


if __name__ == "__main__":
    main()

"""A DC on a big registry, with real anvil and real DC processes: ready means ready (it says
healthy and prints its ready line only once it holds every record), and a restart starts from
its registry snapshot unless the chain no longer has the snapshot's block. Seeded fast by
labkit/seed.py; the fast tests of the same decisions on fakes are in tests/test_scale_fast.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from ntm import keys
from scripts.anvil import Anvil
from scripts.procs import Child, dc_child, free_port
from labkit.dcnet import DcNet, raw_http
from labkit.seed import seed
from labkit.load import read_metric, register_at

SEEDED = 3000
# The chain node answers eth_getLogs this much later: a slow chain node (Besu reading a long log
# range from disk), which also makes the catch-up window wide enough to probe on any machine.
SLOW_LOGS_S = 1.0
# Until a DC's ready line, which comes once it has read the whole registry: more than the usual
# 20 s on a machine loaded by other tests (its Python imports alone took 18 s at load average 24).
START_TIMEOUT_S = 60.0


@dataclass
class LogsProxy:
    """A JSON-RPC proxy in front of a chain node that delays each eth_getLogs answer by `delay`
    and records the first block of each (what a DC reads)."""

    upstream: str
    delay: float = 0.0
    reads: list[int] = field(default_factory=list)
    url: str = ""

    @contextlib.asynccontextmanager
    async def running(self):
        async with aiohttp.ClientSession() as http:

            async def forward(request: web.Request) -> web.Response:
                body = await request.read()
                call = json.loads(body)
                if isinstance(call, dict) and call.get("method") == "eth_getLogs":
                    self.reads.append(int(call["params"][0]["fromBlock"], 16))
                    await asyncio.sleep(self.delay)
                async with http.post(self.upstream, data=body, headers={"Content-Type": "application/json"}) as r:
                    return web.Response(body=await r.read(), content_type="application/json")

            app = web.Application(client_max_size=1 << 20)
            app.router.add_post("/", forward)
            runner = web.AppRunner(app)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.url = f"http://127.0.0.1:{port}"
            try:
                yield self
            finally:
                await runner.cleanup()


def dc1_via(net: DcNet, rpc: str) -> Child:
    """DC 1 of `net` with `rpc` as its only chain node (not started)."""
    net.dcs[0] = dc_child(net.workdir, "dc1", net.workdir / "dc1.key.json", rpc, net.deployment, net.ports[0])
    return net.dcs[0]


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.get(url) as r:
        return r.status, await r.json()


async def test_a_dc_is_unhealthy_and_says_catching_up_until_it_has_read_the_whole_registry(tmp_path):
    """Hostile condition: a DC (re)starting on a chain with thousands of records. Until it has
    read them all, a node it does not know yet may well exist: /healthz must say 503 (a load
    balancer keeps traffic away) and a lookup of a node registered at another DC must answer the
    retryable catching_up, never unknown_node (which a client would take as final). Its chain
    node is slow to answer log queries (SLOW_LOGS_S)."""
    with Anvil() as chain:
        net = DcNet(tmp_path, chain)
        await net.deploy(2)
        net.start_dc(1, timeout=START_TIMEOUT_S)
        try:
            await seed(chain.url, net.registry_address, SEEDED)
            # the last record on chain: a node at dc2, which dc1 can learn of only at the end of its catch-up
            node, status = await register_at(net.urls[1], int(time.time() * 1000))
            assert status == "confirmed"
            healths, lookups = [], []
            async with LogsProxy(chain.url, SLOW_LOGS_S).running() as proxy, raw_http() as http:
                starting = asyncio.create_task(asyncio.to_thread(dc1_via(net, proxy.url).start, START_TIMEOUT_S))
                while not starting.done():
                    try:
                        healths.append(await get(http, net.urls[0] + "/healthz"))
                        lookups.append(await get(http, f"{net.urls[0]}/v1/nodes/{keys.checksum(node)}"))
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.01)  # not listening yet
                await starting
                after = await get(http, net.urls[0] + "/healthz")
                found = await get(http, f"{net.urls[0]}/v1/nodes/{keys.checksum(node)}")
        finally:
            net.stop()
    statuses = [status for status, _ in healths]
    healthy_from = statuses.index(200) if 200 in statuses else len(statuses)  # caught up, ready line on its way
    assert set(statuses[:healthy_from]) == {503} and set(statuses[healthy_from:]) <= {200}, statuses
    assert "catching_up" in [body["chain"] for _, body in healths], healths[:3]
    catching = [body for status, body in lookups if status == 503]
    assert catching and all(b["error"] == "catching_up" for b in catching), lookups[:3]
    assert not [body for status, body in lookups if status == 404], "unknown_node during the catch-up"
    assert after[0] == 200 and after[1]["read_to"] == after[1]["head"], after
    assert found[0] == 200 and found[1]["home_dc"] == keys.checksum(keys.node_id_of(net.dc_keys[1])), found


async def test_a_restarted_dc_reads_only_new_logs_from_its_snapshot_and_discards_one_the_chain_no_longer_has(tmp_path):
    """A DC stopped cleanly leaves a snapshot of its registry cache; restarted, it must read only
    the logs after the snapshot's block and still hold every record. Hostile condition: the chain
    was then reverted past that block (evm_revert: a rollback, a chain node restarted from an older
    state) and went on on another branch: the snapshot must be discarded and the registry read
    from the deployment block, so no record of the lost branch survives in the cache."""
    with Anvil() as chain:
        net = DcNet(tmp_path, chain)
        await net.deploy(1)
        await seed(chain.url, net.registry_address, 600)
        async with LogsProxy(chain.url).running() as proxy:
            dc = dc1_via(net, proxy.url)
            await asyncio.to_thread(dc.start, START_TIMEOUT_S)  # in a thread: the proxy runs on this loop
            dc.stop()  # clean: the snapshot is written
            snap_block = int(chain.rpc("eth_blockNumber"), 16)
            fork = chain.rpc("evm_snapshot")
            await seed(chain.url, net.registry_address, 200)  # blocks after the snapshot's
            proxy.reads.clear()
            await asyncio.to_thread(dc.start, START_TIMEOUT_S)
            try:
                assert await read_metric(net.urls[0], "ntm_dc_registry_nodes") == 800
                assert proxy.reads and min(proxy.reads) == snap_block + 1, (proxy.reads, snap_block)
            finally:
                dc.stop()  # its snapshot is now at a block of the branch about to be lost
            chain.rpc("evm_revert", [fork])
            await seed(chain.url, net.registry_address, 100)  # another branch, as high as the lost one
            proxy.reads.clear()
            await asyncio.to_thread(dc.start, START_TIMEOUT_S)
            try:
                assert await read_metric(net.urls[0], "ntm_dc_registry_nodes") == 700
                assert min(proxy.reads) == 0, proxy.reads
            finally:
                dc.stop()
    assert "snapshot at block" in dc.log_path.read_text() and "discarded" in dc.log_path.read_text()

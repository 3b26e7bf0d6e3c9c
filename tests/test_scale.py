"""A DC on a big registry, with real anvil and real DC processes: ready means ready (it says
healthy and prints its ready line only once it holds every record). Seeded fast by
tests/seed.py; the fast tests of the same decisions on fakes are in tests/test_scale_fast.py."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
from aiohttp import web

from ntm import keys
from scripts.anvil import Anvil
from scripts.procs import dc_child, free_port
from tests.dcnet import DcNet
from tests.seed import seed
from tests.test_chain_robust import register_at

SEEDED = 3000
# The chain node answers eth_getLogs this much later: a slow chain node (Besu reading a long log
# range from disk), which also makes the catch-up window wide enough to probe on any machine.
SLOW_LOGS_S = 1.0


@contextlib.asynccontextmanager
async def slow_logs_proxy(upstream: str):
    """A JSON-RPC proxy in front of `upstream` that delays every eth_getLogs answer by SLOW_LOGS_S."""
    async with aiohttp.ClientSession() as http:
        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            if b'"eth_getLogs"' in body:
                await asyncio.sleep(SLOW_LOGS_S)
            async with http.post(upstream, data=body, headers={"Content-Type": "application/json"}) as r:
                return web.Response(body=await r.read(), content_type="application/json")

        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


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
        net.start_dc(1)
        try:
            await seed(chain.url, net.registry_address, SEEDED)
            # the last record on chain: a node at dc2, which dc1 can learn of only at the end of its catch-up
            node, status = await register_at(net.urls[1], int(time.time() * 1000))
            assert status == "confirmed"
            healths, lookups = [], []
            async with slow_logs_proxy(chain.url) as rpc, aiohttp.ClientSession() as http:
                # start_dc returns at the ready line
                net.dcs[0] = dc_child(tmp_path, "dc1", tmp_path / "dc1.key.json", rpc, net.deployment, net.ports[0])
                starting = asyncio.create_task(asyncio.to_thread(net.dcs[0].start))
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

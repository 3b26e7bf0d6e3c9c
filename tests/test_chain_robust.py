"""The chain as it really is, on real anvil with real DC processes: an idle chain whose latest block
is older than the future window, records at the window's edge, a chain restarted from an older
state (rollback), the chain down and back, and a dead JSON-RPC URL among several."""

from __future__ import annotations

import asyncio
import shutil
import time


from node.dc_client import DcClient
from ntm import keys
from ntm.record import DC_ACCEPT_FUTURE_MS, MAX_FUTURE_MS
from scripts.anvil import Anvil
from scripts.procs import dc_child, free_port
from labkit.dcnet import DcNet, raw_http, register, stateful_net, until
from labkit.load import all_on_chain, read_metric, register_at, register_many

IDLE_S = 1200  # the chain's latest block is this old: twice the contract's future window


async def health(url: str) -> tuple[int, dict]:
    async with raw_http() as http, http.get(url + "/healthz") as r:
        return r.status, await r.json()


async def test_a_lone_registration_confirms_on_a_chain_idle_longer_than_the_window(tmp_path):
    # anvil's clock starts IDLE_S in the past, so deployment's blocks are that old; then its clock
    # jumps to now without a block: the latest block is 20 minutes old, as after an idle weekend.
    with Anvil(extra_args=["--timestamp", str(int(time.time()) - IDLE_S)]) as chain:
        net = DcNet(tmp_path, chain)
        await net.deploy(1)
        chain.rpc("evm_increaseTime", [IDLE_S])
        latest = int(chain.rpc("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)
        assert time.time() - latest > MAX_FUTURE_MS / 1000, "the chain is not idle: the test proves nothing"
        net.start_dc(0)
        try:
            url = net.urls[0]
            now = int(time.time() * 1000)
            # The first record goes alone onto the idle chain, right at the DC's edge.
            edge, status = await register_at(url, now + DC_ACCEPT_FUTURE_MS - 2000)
            assert status == "confirmed"
            # Around both windows: refused by the DC, or confirmed by the chain; never acknowledged then lost.
            outcomes = {}
            for offset in (DC_ACCEPT_FUTURE_MS + 2000, MAX_FUTURE_MS - 1000, MAX_FUTURE_MS + 1000, 0):
                outcomes[offset] = (await register_at(url, int(time.time() * 1000) + offset))[1]
            assert outcomes == {
                DC_ACCEPT_FUTURE_MS + 2000: "refused:future",
                MAX_FUTURE_MS - 1000: "refused:future",
                MAX_FUTURE_MS + 1000: "refused:future",
                0: "confirmed",
            }
            reg = await net.registry()
            try:
                assert (await reg.lookup(edge)).dc == keys.node_id_of(net.dc_keys[0])
            finally:
                await reg.close()
        finally:
            net.stop()


async def test_a_chain_restarted_from_an_older_state_gets_every_confirmed_record_back(tmp_path):
    async with stateful_net(tmp_path) as net:
        net.chain.stop()  # dumps the state: registry deployed, DC admitted, no node yet
        shutil.copy(net.chain.state_path, tmp_path / "chain-old.json")
        shutil.copy(net.chain.state_path, tmp_path / "chain-older.json")
        net.restart_chain()
        net.start_dc(0)
        dc_addr = keys.node_id_of(net.dc_keys[0])
        confirmed = [
            n
            for n, s in [await register_at(net.urls[0], int(time.time() * 1000)) for _ in range(4)]
            if s == "confirmed"
        ]
        assert len(confirmed) == 4
        net.restart_chain(tmp_path / "chain-old.json")  # a crash that lost the last blocks
        await all_on_chain(net, confirmed, dc_addr, timeout=60)  # the DC sent them again by itself
        assert await read_metric(net.urls[0], "ntm_dc_outbox_reopened_total") == 4  # they were lost, not kept
        assert await read_metric(net.urls[0], "ntm_dc_chain_rollbacks_total") == 1
        # ... and the DC's nonce is the chain's again: later registrations confirm
        later = await register_at(net.urls[0], int(time.time() * 1000))
        assert later[1] == "confirmed"
        # The same rollback while the DC is down: it sees it from its database when it starts.
        net.dcs[0].stop()
        net.restart_chain(tmp_path / "chain-older.json")
        net.start_dc(0)
        await all_on_chain(net, confirmed + [later[0]], dc_addr, timeout=60)
        assert await read_metric(net.urls[0], "ntm_dc_outbox_reopened_total") == 5


async def test_chain_down_then_back_durable_then_confirmed_and_health_says_so(tmp_path):
    async with stateful_net(tmp_path) as net:
        net.start_dc(0)
        url, dc_addr = net.urls[0], keys.node_id_of(net.dc_keys[0])
        status, body = await health(url)
        assert status == 200 and body["chain"] == "ok" and body["gas"] in ("ok", "unknown")
        node = keys.generate()
        await register(url, node)
        net.chain.stop()
        during = await register_many(url, 3)  # acknowledged "durable" with the chain down
        async with DcClient(url) as dc:  # lookups go on from the registry cache
            assert (await dc.whois(keys.node_id_of(node))).home_dc == keys.checksum(dc_addr)
        status, body = await until(lambda: _down(url), timeout=30)
        assert status == 503 and body["ok"] is False and body["outbox_pending"] == 3
        net.restart_chain()
        await all_on_chain(net, during, dc_addr)
        status, body = await until(lambda: _ok(url), timeout=30)
        assert body["chain"] == "ok" and body["outbox_pending"] == 0


async def _down(url: str):
    status, body = await health(url)
    return (status, body) if body["chain"] == "down" else None


async def _ok(url: str):
    status, body = await health(url)
    return (status, body) if status == 200 else None


class TcpProxy:
    """A TCP pass-through to the chain that can be killed mid-run (a validator going down)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.writers: list[asyncio.StreamWriter] = []

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def kill(self) -> None:
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        await self.server.wait_closed()


async def test_a_dc_carries_on_when_one_of_its_rpc_urls_is_dead(tmp_path):
    with Anvil() as chain:
        net = DcNet(tmp_path, chain)
        await net.deploy(3)
        proxy = TcpProxy(chain.port)
        proxy_url = await proxy.start()
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there

        def start(i: int, urls: list[str]) -> None:
            net.dcs[i] = dc_child(
                tmp_path,
                f"dc{i + 1}",
                tmp_path / f"dc{i + 1}.key.json",
                urls[0],
                net.deployment,
                net.ports[i],
                extra=[a for u in urls[1:] for a in ("--rpc-url", u)],
            ).start()

        # dc3's key is nearly broke: it serves, but its health says gas is low
        chain.rpc("anvil_setBalance", [keys.checksum(keys.node_id_of(net.dc_keys[2])), hex(10**12)])
        try:
            await asyncio.gather(
                *(
                    asyncio.to_thread(start, i, urls)
                    for i, urls in enumerate([[dead, chain.url], [proxy_url, chain.url], [chain.url]])
                )
            )
            assert (await register_at(net.urls[0], int(time.time() * 1000)))[
                1
            ] == "confirmed"  # own node dead from the start
            assert (await register_at(net.urls[1], int(time.time() * 1000)))[1] == "confirmed"
            await proxy.kill()  # dc2's own node goes down mid-run
            assert (await register_at(net.urls[1], int(time.time() * 1000)))[1] == "confirmed"
            status, body = await health(net.urls[1])
            assert status == 200 and body["chain"] == "ok"
            status, body = await health(net.urls[2])
            assert status == 503 and body["gas"] == "low" and body["chain"] == "ok"
            assert body["gas_balance_wei"] == 10**12 < body["gas_low_below_wei"]
        finally:
            net.stop()
            await proxy.kill()


async def test_confirmed_means_n_blocks_deep(tmp_path):
    """--confirmations 3 on a chain that makes a block every second: the DC answers "confirmed"
    only once the record's block has two more on top of it."""
    with Anvil(block_time=1) as chain:
        net = DcNet(tmp_path, chain)
        await net.deploy(1)
        net.start_dc(0, ("--confirmations", "3"))
        try:
            key = keys.generate()
            res = await register(net.urls[0], key)
            head = int(chain.rpc("eth_blockNumber"), 16)
            assert res.status == "confirmed" and head >= res.block + 2, (res, head)
        finally:
            net.stop()

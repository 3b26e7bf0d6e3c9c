"""Nothing acknowledged is lost: kill -9 of a DC before the chain confirms, and a chain restart."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3

import pytest

from ntm import keys
from scripts.anvil import Anvil
from scripts.procs import dc_child, free_port
from labkit.dcnet import DcNet, stateful_net, until
from labkit.load import all_on_chain, register_many


async def test_kill9_after_ack_before_confirmation(tmp_path):
    """Blocks every 2 s: acknowledged registrations sit unconfirmed long enough to crash the DC.
    300 of them go out as several registerBatch transactions in flight at once (issue 30 item 5:
    consecutive nonces), so a block carries more than one of the DC's transactions (one at a time
    never could). Hostile condition: kill -9 of the DC with transactions in the chain's pool and
    rows pending; the restarted DC sends what it has not seen confirmed and everything lands."""
    with Anvil(block_time=2) as chain:
        net = DcNet(tmp_path, chain)
        await net.deploy(1)
        extra = ("--new-nodes-per-hour", "1e9")  # the pipeline is tested, not the gas budget
        dc = net.start_dc(0, extra)
        try:
            nodes = await register_many(net.urls[0], 300)
            dc.kill()
            reg = await net.registry()
            unconfirmed = [n for n in nodes if await reg.lookup(n) is None]
            await reg.close()
            assert unconfirmed, "the chain confirmed before the crash; the test proves nothing"
            net.start_dc(0, extra)
            await until(lambda: outbox_count(net, "state='pending'") == 0, timeout=60, interval=0.2)
            dc_addr = keys.node_id_of(net.dc_keys[0])
            await all_on_chain(net, nodes, dc_addr)
            ours = []
            for number in range(1, int(chain.rpc("eth_blockNumber"), 16) + 1):
                block = chain.rpc("eth_getBlockByNumber", [hex(number), True])
                ours.append(sum(keys.parse_node_id(tx["from"]) == dc_addr for tx in block["transactions"]))
            assert max(ours) >= 2, ours  # several of the DC's transactions in one block
        finally:
            net.stop()


async def test_chain_restart_with_state_keeps_everything(tmp_path):
    async with stateful_net(tmp_path) as net:
        net.start_dc(0)
        dc_addr = keys.node_id_of(net.dc_keys[0])
        before = await register_many(net.urls[0], 5)
        await all_on_chain(net, before, dc_addr)
        net.chain.stop()  # chain goes away (state dumped on SIGTERM)
        during = await register_many(net.urls[0], 10)  # the DC still acknowledges: durable in SQLite
        net.dcs[0].kill()  # and crashes while the chain is down
        net.restart_chain()
        net.start_dc(0)
        await all_on_chain(net, before + during, dc_addr)


def outbox_count(net: DcNet, where: str, *args) -> int:
    with sqlite3.connect(net.workdir / "dc1.sqlite") as db:
        return db.execute(f"SELECT count(*) FROM outbox WHERE {where}", args).fetchone()[0]


async def test_kill9_of_the_chain_mid_storm_every_acknowledged_record_ends_confirmed_on_chain(tmp_path):
    """Hostile condition: the chain node crashes (anvil with --state-interval 1, SIGKILL by PID) while
    registrations stream in. The blocks mined since its last state dump are lost, with records the
    DC had already called confirmed, and the restarted chain mines those heights again for the DC's
    next transactions. The DC must see the rollback, put those records back to pending and send
    them again: every acknowledged record ends confirmed in its outbox and on chain."""
    async with stateful_net(tmp_path) as net:
        net.start_dc(0, ("--new-nodes-per-hour", "1000000"))  # the gas budget is not under test
        dc_addr = keys.node_id_of(net.dc_keys[0])
        acked: list[bytes] = []
        storming = True

        async def storm() -> None:
            while storming:
                acked.extend(await register_many(net.urls[0], 8))

        task = asyncio.create_task(storm())
        lost = 0
        try:
            for _ in range(3):  # a kill right after a state dump loses nothing: kill again
                await until(
                    lambda n=len(acked): outbox_count(net, "state='confirmed'") >= 24 and len(acked) >= n + 24,
                    timeout=20,
                    interval=0.05,
                )
                net.chain.kill()
                dumped = json.loads(net.chain.state_path.read_text())["best_block_number"]
                lost = outbox_count(net, "state='confirmed' AND block > ?", dumped)  # "confirmed", now gone
                net.restart_chain()
                if lost:
                    break
            assert lost, "no kill lost a block the DC had called confirmed: the test proves nothing"
            await until(lambda n=len(acked): len(acked) >= n + 16, timeout=20)  # the storm goes on after the restart
        finally:
            storming = False
            await task
        await all_on_chain(net, acked, dc_addr, timeout=30)
        await until(lambda: outbox_count(net, "state != 'confirmed'") == 0, timeout=10)
        assert outbox_count(net, "state='confirmed'") == len(acked)


async def test_a_second_dc_on_the_same_database_is_refused(tmp_path):
    """Two DCs with one SQLite file would both sign and submit its outbox: the second is refused
    while the first lives, and a SIGKILLed first leaves no stale lock behind."""
    with Anvil() as chain:
        net = DcNet(tmp_path, chain)
        await net.deploy(1)
        first = net.start_dc(0)
        try:
            second = dc_child(tmp_path, "dc1", tmp_path / "dc1.key.json", chain.url, net.deployment, free_port())
            with pytest.raises(RuntimeError, match="in use by another running process"):
                second.start(timeout=15)
            first.kill()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:  # and a busy UDP port is named
                busy.bind(("127.0.0.1", 0))
                taken = busy.getsockname()[1]
                with pytest.raises(RuntimeError, match=f"cannot bind UDP 127.0.0.1:{taken}"):
                    net.start_dc(0, ("--udp-port", str(taken)))
            net.start_dc(0)  # the same database, free again
        finally:
            net.stop()

"""The DC at scale, on fakes (tests/fakes.py): what a lookup says before the registry cache has
caught up; the registry snapshot, used or discarded. The same against anvil and real DC
processes: tests/test_scale.py."""

from __future__ import annotations

import asyncio
import sys
import types
from typing import Callable

import pytest

from chain.registry import Registry, _Abi, load_artifact
from daemon import atomic_file
from dc import dashboard, snapshot, wiring
from dc import status as dc_status
from dc.cache import LOG_CHUNK, RegistryCache
from dc.chainstatus import ChainStatus
from dc.coordinator import Coordinator
from dc.errors import NodeLookupError
from dc.dashboard import NODES_LISTED
from dc import store as store_module
from dc.store import Store
from node import dc_session
from ntm import keys
from ntm.clock import Clock
from ntm.record import NodeTransaction
from ntm.registration import RegistrationRequest
from ntm.registry import RegistryError
from tests.fakes import FakeChain, FakeClock, FakeRegistry, fake_dc

DC_ENDPOINT = "http://dc.test:8330"
real_read = dc_status.read


def seed_chain(chain: FakeChain, dc: bytes, n: int) -> list[bytes]:
    """`n` records of fresh nodes at `dc`, one block (registerBatch)."""
    items = []
    for _ in range(n):
        key = keys.generate()
        rec = NodeTransaction(keys.node_id_of(key), dc, chain.clock.wall_ms())
        items.append((rec, rec.sign(key, chain.domain)))
    chain.register(dc, items)
    return [rec.node for rec, _ in items]


@pytest.fixture
def chain() -> FakeChain:
    c = FakeChain(clock=FakeClock())
    c.admit(b"\x01" * 20, "other", "http://other.test:8330")
    return c


def coordinator(tmp_path, chain: FakeChain, name: str = "dc") -> Coordinator:
    key = keys.generate()
    chain.admit(keys.node_id_of(key), name, DC_ENDPOINT)
    return fake_dc(chain, key, tmp_path, name, [])


async def test_before_the_first_catch_up_a_missing_node_is_catching_up_not_unknown(tmp_path, chain):
    """Hostile condition: a DC asked about nodes while it has not read the registry yet (it just
    started). A node it does not know may exist: the answer must be the retryable catching_up
    (and /healthz not ok), and only once the cache is complete is a stranger unknown_node."""
    (remote,) = seed_chain(chain, b"\x01" * 20, 1)
    c = coordinator(tmp_path, chain)
    status = ChainStatus(c.cache, c.registry, 45_000)
    stranger = keys.node_id_of(keys.generate())
    for node in (remote, stranger):
        with pytest.raises(NodeLookupError) as exc:
            await c.lookup(node)
        assert exc.value.code == "catching_up"
    assert status.report()["chain"] == "down"  # no head read yet at all
    for _ in range(LOG_CHUNK):  # more blocks than one log query reads
        chain._mine()
    assert not await c.cache.poll() and status.report()["chain"] == "catching_up"
    with pytest.raises(NodeLookupError) as exc:
        await c.lookup(stranger)
    assert exc.value.code == "catching_up"
    assert await c.cache.poll() and c.cache.caught_up
    assert status.report()["chain"] == "ok"
    with pytest.raises(NodeLookupError) as exc:
        await c.lookup(stranger)
    assert exc.value.code == "unknown_node"
    assert c.cache.home_of(remote) is not None  # known now: a lookup goes to its home DC


class CountingRegistry(FakeRegistry):
    """A FakeRegistry that records the block ranges the cache reads logs from."""

    def __init__(self, chain: FakeChain, sender: bytes) -> None:
        super().__init__(chain, sender)
        self.reads: list[tuple[int, int]] = []

    async def get_events(self, from_block: int, to_block: int):
        self.reads.append((from_block, to_block))
        return await super().get_events(from_block, to_block)


async def caught_up_cache(chain: FakeChain) -> RegistryCache:
    cache = RegistryCache(CountingRegistry(chain, b"\x01" * 20))
    while not await cache.poll():
        pass
    return cache


async def test_a_good_snapshot_makes_the_restart_read_only_the_logs_since(chain):
    """A DC restarted on a registry with history: it must start from its snapshot (checked
    against the chain's hash at its block) and read only what came after, yet end up with every
    record, old and new."""
    seed_chain(chain, b"\x01" * 20, 50)
    old = await caught_up_cache(chain)
    data = snapshot.encode(old.snapshot())
    newer = seed_chain(chain, b"\x01" * 20, 10)
    fresh = RegistryCache(CountingRegistry(chain, b"\x01" * 20))
    assert await fresh.restore(snapshot.decode(data, chain.chain_id, chain.address, 0))
    assert not fresh.caught_up  # the logs since are still to be read
    while not await fresh.poll():
        pass
    assert fresh.registry.reads and min(start for start, _ in fresh.registry.reads) == old.block + 1
    assert fresh.nodes == chain.nodes and all(n in fresh.nodes for n in newer)
    assert fresh.dcs == old.dcs


async def test_a_snapshot_of_another_chain_or_of_a_block_the_chain_no_longer_has_is_discarded(chain, tmp_path):
    """Hostile conditions: the DC's data directory is reused on another chain or registry; the
    chain rolled back past the snapshot's block (a reorg, or a chain node restarted from an older
    state) and is now shorter, or went on on another branch; the file is damaged. Each snapshot
    must be refused (the registry is then read from the deployment block), never merged in."""
    seed_chain(chain, b"\x01" * 20, 5)
    before = chain.snapshot()
    seed_chain(chain, b"\x01" * 20, 5)
    cache = await caught_up_cache(chain)
    data = snapshot.encode(cache.snapshot())
    path = tmp_path / "dc.sqlite.snapshot"
    atomic_file.replace_file(path, data)
    assert snapshot.read(path, chain.chain_id, chain.address, 0) is not None
    for chain_id, registry, from_block in (
        (chain.chain_id + 1, chain.address, 0),
        (chain.chain_id, b"\x77" * 20, 0),
        (chain.chain_id, chain.address, 3),
    ):
        assert snapshot.read(path, chain_id, registry, from_block) is None
        with pytest.raises(snapshot.SnapshotError, match="another chain"):
            snapshot.decode(data, chain_id, registry, from_block)
    for damaged in (data[:-1], data[:-49] + bytes(49), b"garbage"):
        with pytest.raises(snapshot.SnapshotError):
            snapshot.decode(damaged, chain.chain_id, chain.address, 0)
    snap = snapshot.decode(data, chain.chain_id, chain.address, 0)
    chain.restore(before)  # shorter: the snapshot's block is gone
    fresh = RegistryCache(FakeRegistry(chain, b"\x01" * 20))
    assert not await fresh.restore(snap) and fresh.nodes == {} and fresh.block == -1
    seed_chain(chain, b"\x01" * 20, 7)  # as long again, on another branch
    assert chain.block >= snap.block
    assert not await fresh.restore(snap) and fresh.nodes == {}
    while not await fresh.poll():
        pass
    assert fresh.nodes == chain.nodes and len(fresh.nodes) == 12


def cost(db, fn: Callable[[], object]) -> tuple[int, int]:
    """(Python lines run, SQLite virtual-machine steps) while `fn` runs: work counted, not timed,
    so a walk over all nodes shows however loaded the machine is. (Work inside one C call, such
    as copying a dict, is not seen; the endpoints make none of those over nodes.)"""
    lines = steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    def trace(frame, event, arg):
        nonlocal lines
        if frame.f_code is step.__code__:
            return None  # the counting itself
        lines += event == "line"
        return trace

    db.set_progress_handler(step, 1)
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
        db.set_progress_handler(None, 1)
    return lines, steps


async def test_metrics_and_the_dashboard_do_not_walk_the_nodes(tmp_path, chain):
    """Hostile condition: a DC that carries a city (100k+ records), its operator's dashboard
    polling every 2 s and Prometheus scraping /metrics. Each answer must cost the same work
    whatever the number of nodes in the registry and in the DC's store: counted in Python lines
    and SQLite steps at two sizes ten times apart."""
    c = coordinator(tmp_path, chain)
    status = ChainStatus(c.cache, c.registry, 45_000)
    c.metrics.watch(c, status)
    probe = wiring.probe(c)
    costs = []
    for n in (2 * NODES_LISTED + 100, 20 * NODES_LISTED + 1000):  # half in the store: more than it lists
        more = n - len(c.cache.nodes) - c.store.node_count()
        seed_chain(chain, b"\x01" * 20, more // 2)
        reqs = [
            RegistrationRequest.signed(keys.generate(), c.info(), chain.clock.wall_ms())
            for _ in range(more - more // 2)
        ]
        await asyncio.gather(*(c.store.add(r) for r in reqs))
        while not await c.cache.poll():
            pass
        assert len(c.cache.nodes) + c.store.node_count() == n
        costs.append(
            (cost(c.store.db, c.metrics.render), cost(c.store.db, lambda: dashboard.snapshot(c, status, probe, 0.0)))
        )
    (small_metrics, small_dash), (big_metrics, big_dash) = costs
    for small, big in ((small_metrics, big_metrics), (small_dash, big_dash)):
        assert big[0] <= small[0] * 1.05 and big[1] <= small[1] * 1.05, costs


async def test_the_kept_counts_follow_every_change_of_the_store(tmp_path, chain):
    """The O(1) counts are kept by SQLite triggers: after adds, state changes and a database
    from before the counts (reopened), they must equal count(*)."""
    c = coordinator(tmp_path, chain)
    reqs = [RegistrationRequest.signed(keys.generate(), c.info(), chain.clock.wall_ms()) for _ in range(30)]
    await asyncio.gather(*(c.store.add(r) for r in reqs))
    await c.store.add(RegistrationRequest.signed(keys.generate(), c.info(), chain.clock.wall_ms() + 1))
    items = c.store.pending(20)
    c.store.settle(
        [(i, "confirmed", "0x01", 1, None) for i in items[:15]] + [(i, "rejected", None, None, "x") for i in items[15:]]
    )
    c.store.reopen(items[:3])

    def truth() -> dict:
        db = c.store.db
        return {
            "nodes": db.execute("SELECT count(*) FROM nodes").fetchone()[0],
            **{
                s: db.execute("SELECT count(*) FROM outbox WHERE state=?", (s,)).fetchone()[0]
                for s in ("pending", "confirmed", "rejected")
            },
        }

    def kept() -> dict:
        return {
            "nodes": c.store.node_count(),
            **{s: c.store.count_outbox(s) for s in ("pending", "confirmed", "rejected")},
        }

    assert kept() == truth() == {"nodes": 31, "pending": 14, "confirmed": 12, "rejected": 5}
    c.store.db.executescript(
        "DROP TABLE counts; DROP TRIGGER nodes_added; DROP TRIGGER nodes_removed; "
        "DROP TRIGGER outbox_added; DROP TRIGGER outbox_removed; DROP TRIGGER outbox_moved;"
    )
    c.store.close()
    c.store = Store(tmp_path / "dc.sqlite", c.address)
    assert kept() == truth()


async def test_the_node_read_cache_never_serves_a_row_the_store_changed(tmp_path, chain, monkeypatch):
    """Store.node answers from memory: a registration (a new node, a newer record, a revocation)
    must show at once, an older record must not replace a newer one, and a stranger asking about
    many unknown IDs fills at most NODE_CACHE_MAX entries."""
    monkeypatch.setattr(store_module, "NODE_CACHE_MAX", 8)
    c = coordinator(tmp_path, chain)
    key, now = keys.generate(), chain.clock.wall_ms()
    node = keys.node_id_of(key)
    assert c.store.node(node) is None  # read (and cached) before it registers
    await c.store.add(RegistrationRequest.signed(key, c.info(), now, ["198.18.0.1:5000"]))
    assert c.store.node(node).local_addrs == ("198.18.0.1:5000",)
    await c.store.add(RegistrationRequest.signed(key, c.info(), now + 10, ["198.18.0.2:5000"], revoked=True))
    assert (c.store.node(node).timestamp, c.store.node(node).revoked) == (now + 10, True)
    await c.store.add(RegistrationRequest.signed(key, c.info(), now + 5, ["198.18.0.3:5000"]))  # older: ignored
    assert c.store.node(node).timestamp == now + 10
    assert c.store.node(node).local_addrs == ("198.18.0.2:5000",)
    for i in range(100):
        assert c.store.node(i.to_bytes(20, "big")) is None
    assert len(c.store._nodes) <= 8
    assert c.store.node(node).timestamp == now + 10  # dropped from memory: read again from the file


async def test_a_node_asks_again_while_its_dc_is_catching_up_and_not_after_a_final_refusal(monkeypatch):
    """A node whose DC just restarted (still reading the registry) gets catching_up: it must
    ask again until the direction timeout, but take unknown_node (final) at once."""
    monkeypatch.setattr(dc_session, "CATCHING_UP_RETRY_S", 0.01)
    monkeypatch.setattr(dc_session, "DIRECTION_TIMEOUT_S", 0.5)
    session = dc_session.DcSession(
        keys.generate(), "http://dc.test:8330", None, Clock(), 25.0, [], on_direction=None, on_moved=lambda: None
    )
    answers: list = []

    async def once(peer, route, resume):
        code = answers.pop(0)
        if code is None:
            return b"\x01" * 8
        raise dc_session.NodeError(code, code)

    session._direction_once = once
    answers[:] = ["catching_up", "catching_up", None]
    assert await session.direction(b"\x02" * 20) == b"\x01" * 8 and not answers
    answers[:] = ["unknown_node", None]
    with pytest.raises(dc_session.NodeError, match="unknown_node"):
        await session.direction(b"\x02" * 20)
    assert answers == [None]
    answers[:] = ["catching_up"] * 1000
    with pytest.raises(dc_session.NodeError, match="catching_up"):
        await session.direction(b"\x02" * 20)
    assert 0 < len(answers) <= 997  # asked again and again, then gave up at the timeout


async def test_confirmed_outbox_rows_deeper_than_the_rollback_horizon_are_pruned_and_no_others(tmp_path, chain):
    """The outbox must not grow forever (it was half of a busy DC's file), yet a row that a
    rollback could still undo, a pending one and a rejected one must stay."""
    c = coordinator(tmp_path, chain)
    reqs = [RegistrationRequest.signed(keys.generate(), c.info(), chain.clock.wall_ms()) for _ in range(6)]
    await asyncio.gather(*(c.store.add(r) for r in reqs))
    items = c.store.pending(6)
    c.store.settle(
        [
            (items[0], "confirmed", "0x01", 10, None),
            (items[1], "confirmed", "0x02", 2000, None),
            (items[2], "rejected", None, None, "stale"),
            (items[3], "confirmed", "0x03", 11, None),
        ]
    )
    assert c.store.prune_confirmed(1000) == 2
    assert c.store.outbox_state(items[0].record.node, items[0].record.timestamp) is None
    assert c.store.outbox_state(items[1].record.node, items[1].record.timestamp)[0] == "confirmed"
    assert [c.store.count_outbox(s) for s in ("pending", "confirmed", "rejected")] == [2, 1, 1]
    assert c.store.node(items[0].record.node) is not None  # the node's record itself stays


async def test_logs_are_sliced_from_the_raw_answer_and_garbage_from_a_chain_node_is_a_clear_error():
    """The catch-up reads eth_getLogs' raw JSON (chain/registry.py). Hostile condition: a chain
    node (one of the DC's fallback URLs) answering garbage: a RegistryError (the follower retries
    with backoff), never an exception that would end the follower."""
    reg = Registry.__new__(Registry)
    reg._abi, reg.address = _Abi(load_artifact()["abi"]), b"\x5f" * 20
    answers: list = []

    async def make_request(method, params):
        return answers.pop(0)

    reg.w3 = types.SimpleNamespace(provider=types.SimpleNamespace(make_request=make_request))
    topic = "0x" + reg._abi.topics["NodeRegistered"].hex()
    log = {
        "topics": [topic, "0x" + "00" * 12 + "11" * 20, "0x" + "00" * 12 + "22" * 20],
        "data": "0x" + "%064x" % 123,
        "blockNumber": "0x5",
        "logIndex": "0x1",
        "transactionHash": "0x" + "33" * 32,
    }
    answers.append({"result": [log]})
    (ev,) = await reg.get_events(0, 5)
    assert (ev.kind, ev.node, ev.dc, ev.timestamp, ev.block, ev.log_index) == (
        "NodeRegistered",
        b"\x11" * 20,
        b"\x22" * 20,
        123,
        5,
        1,
    )
    for garbage in (
        {"result": [{**log, "topics": [topic, "0xzz", "0x00"]}]},
        {"result": [{"topics": [topic]}]},
        {"result": [{**log, "blockNumber": None}]},
        {"error": {"message": "range too large"}},
        ["x"],
    ):
        answers.append(garbage)
        with pytest.raises(RegistryError):
            await reg.get_events(0, 5)


def test_a_batch_is_sized_so_the_pipeline_fits_one_block():
    """Issue 30 item 5: PIPELINE_DEPTH batches' gas limits fit the block's gas limit (more would
    wait for the next block, or never fit one); an unknown head keeps the old size."""
    from chain.registry import BATCH_GAS_BASE, BATCH_GAS_PER_RECORD
    from dc.submitter import BATCH_CAP, BATCH_MAX, PIPELINE_DEPTH, batch_size

    def gas(n: int) -> int:
        return PIPELINE_DEPTH * (BATCH_GAS_BASE + BATCH_GAS_PER_RECORD * n)

    for limit in (30_000_000, 36_000_000, 8_000_000):
        n = batch_size(limit)
        assert gas(n) <= limit < gas(n + 1), limit
    assert batch_size(30_000_000) == 165  # anvil's default: 660 records a block instead of 200
    assert batch_size(0) == BATCH_MAX and batch_size(100_000) == 1 and batch_size(10**12) == BATCH_CAP


async def test_a_scrape_reads_the_status_once_and_the_next_scrape_afresh(tmp_path, chain, monkeypatch):
    """Hostile condition: an operator's monitoring scraping /metrics right after a change (a node
    registered between two scrapes). One scrape's gauges share one status read (not one per
    gauge), yet the next scrape must show the change, however soon it comes."""
    c = coordinator(tmp_path, chain)
    c.metrics.watch(c, ChainStatus(c.cache, c.registry, 45_000))
    reads = []
    monkeypatch.setattr(dc_status, "read", lambda *a: reads.append(1) or real_read(*a))
    assert b"ntm_dc_nodes_stored 0.0" in c.metrics.render() and len(reads) == 1
    await c.store.add(RegistrationRequest.signed(keys.generate(), c.info(), chain.clock.wall_ms()))
    assert b"ntm_dc_nodes_stored 1.0" in c.metrics.render() and len(reads) == 2

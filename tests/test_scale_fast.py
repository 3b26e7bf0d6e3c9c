"""The DC at scale, on fakes (tests/fakes.py): what a lookup says before the registry cache has
caught up. The same against anvil and real DC processes: tests/test_scale.py."""

from __future__ import annotations

import pytest

from dc.cache import LOG_CHUNK, RegistryCache
from dc.chainstatus import ChainStatus
from dc.coordinator import Coordinator
from dc.errors import NodeLookupError
from dc.store import Store
from ntm import keys
from ntm.record import NodeTransaction
from tests.fakes import FakeChain, FakeClock, FakeRegistry

DC_ENDPOINT = "http://dc.test:8330"


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
    addr = keys.node_id_of(key)
    chain.admit(addr, name, DC_ENDPOINT)
    reg = FakeRegistry(chain, addr)
    return Coordinator(key, reg, Store(tmp_path / f"{name}.sqlite", addr), RegistryCache(reg), name, [], (4331, 4332),
                       clock=chain.clock)


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

"""labkit/seed.py's cached chains (bench/scale.py's 100k records): the chain loaded from the cache
must be the chain that was seeded, blocks and logs included, since a DC reads every record from
the logs as in production; and a second run must load it rather than seed again."""

from __future__ import annotations

from labkit import seed
from ntm import keys

RECORDS = 300


def registry_logs(chain, registry: bytes) -> list[dict]:
    return chain.rpc("eth_getLogs", [{"fromBlock": "0x0", "toBlock": "latest", "address": keys.checksum(registry)}])


async def test_a_cached_chain_is_built_once_then_loaded_with_the_same_blocks_and_logs(tmp_path, monkeypatch):
    """What could go wrong: a cache that loads the state without the history (a DC would then read
    no record from the logs), or a second run that seeds again (minutes at 100k)."""
    monkeypatch.setattr(seed, "CACHE_DIR", tmp_path)
    async with seed.seeded_chain(RECORDS) as (chain, registry):
        head = chain.rpc("eth_getBlockByNumber", ["latest", False])
        logs = registry_logs(chain, registry)
    registered = [log for log in logs if log["topics"][0] == seed.REGISTERED_TOPIC]
    assert len(registered) == RECORDS and len({log["topics"][1] for log in registered}) == RECORDS

    async def no_seeding(records: int):
        raise AssertionError("seeded again instead of loading the cache")

    monkeypatch.setattr(seed, "_build", no_seeding)
    async with seed.seeded_chain(RECORDS) as (loaded, same):
        assert same == registry
        assert loaded.rpc("eth_getBlockByNumber", [head["number"], False])["hash"] == head["hash"]
        assert registry_logs(loaded, registry) == logs

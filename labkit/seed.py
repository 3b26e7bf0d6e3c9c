"""Many registry records on a real chain, fast: node-signed records sent by a seeding DC in
`registerBatch` transactions (no DC process, no HTTP), for the scale test and bench/scale.py.

The seeding DC is admitted with an endpoint nobody answers on: its records are only there to make
the registry big (every DC's cache must hold them, and a catch-up must read them).
"""

from __future__ import annotations

import asyncio
import time

from chain.registry import Registry
from ntm import keys
from ntm.record import Domain, NodeTransaction
from scripts.anvil import DEV_KEYS

SEED_KEY = DEV_KEYS[9]  # the last funded dev account: DcNet uses the first ones for the owner and DCs
RECORDS_PER_TX = 500  # 500 × 45k gas: under anvil's default 30M block gas limit
TX_IN_FLIGHT = 4  # several transactions pipelined (nonces in order; anvil mines each as it comes)


def signed_records(n: int, dc: bytes, domain: Domain, timestamp_ms: int) -> list[tuple[NodeTransaction, bytes]]:
    """`n` records of fresh node keys naming `dc`, each signed by its node."""
    out = []
    for _ in range(n):
        key = keys.generate()
        rec = NodeTransaction(keys.node_id_of(key), dc, timestamp_ms)
        out.append((rec, keys.sign_digest(key, rec.digest(domain))))
    return out


async def seed(rpc_url: str, registry_address: bytes, n: int, per_tx: int = RECORDS_PER_TX) -> bytes:
    """Put `n` records on chain (admitting the seeding DC first, once); the seeding DC's address."""
    seeder = keys.node_id_of(keys.private_key(SEED_KEY))
    async with await Registry.connect(rpc_url, registry_address, DEV_KEYS[0]) as owner:
        if await owner.dc(seeder) is None:
            await owner.admit_dc(seeder, "seed", "http://127.0.0.1:9")
    async with await Registry.connect(rpc_url, registry_address, SEED_KEY) as reg:
        items = signed_records(n, seeder, reg.domain, int(time.time() * 1000))
        batches = [items[i : i + per_tx] for i in range(0, n, per_tx)]
        for start in range(0, len(batches), TX_IN_FLIGHT):
            results = await asyncio.gather(*(reg.submit(b) for b in batches[start : start + TX_IN_FLIGHT]))
            assert all(not r.rejected for r in results), [r.reasons[:3] for r in results]
    return seeder

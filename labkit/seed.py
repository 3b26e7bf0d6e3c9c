"""Many registry records on a real chain, fast: node-signed records sent by a seeding DC in
`registerBatch` transactions (no DC process, no HTTP), for the scale test and bench/scale.py.

The seeding DC is admitted with an endpoint nobody answers on: its records are only there to make
the registry big (every DC's cache must hold them, and a catch-up must read them).

Where the time goes (100k records, 2 cores): signing ~260 µs per record in Python, so batches are
signed in worker processes while anvil mines the previous ones; the calldata is built by hand (the
records are static tuples: 5 words each) and the receipts read raw, since web3's ABI encoder and
its receipt formatting (a checksum for every log) cost as much again as the signing.

`seeded_chain(n)` builds a chain holding the registry and `n` records once, keeps anvil's state
(`anvil_dumpState`) in a cache file keyed by the contract's bytecode, anvil's version and `n`, and
later starts anvil from that file (`--load-state`): the records are real blocks and logs on that chain, read by DCs as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import multiprocessing
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import aiohttp
from eth_account import Account

from daemon import atomic_file
from chain.registry import BATCH_GAS_BASE, BATCH_GAS_PER_RECORD, Registry, fee_fields, load_artifact
from ntm import keys
from ntm.record import Domain, NodeTransaction, to_compact
from scripts.anvil import DEV_KEYS, Anvil, anvil_binary

SEED_KEY = DEV_KEYS[9]  # the last funded dev account: DcNet uses the first ones for the owner and DCs
RECORDS_PER_TX = 500  # 500 × 45k gas: under anvil's default 30M block gas limit
TX_IN_FLIGHT = 4  # several transactions pipelined (nonces in order; anvil mines each as it comes)
SIGNING_WORKERS = 2  # processes signing batches: this machine's cores (anvil mines meanwhile)
RECEIPT_POLL_S = 0.005  # anvil automines a batch in ~10-50 ms
RECEIPT_NUDGE_S = 15.0  # far above a loaded machine's mining time for one batch (~10-50 ms idle)
RECEIPT_TIMEOUT_S = 120.0  # a batch of 500 records on a machine loaded by other tests
# The chain cache (anvil's state, gzipped: ~0.45 KB per record), outside the repository; per machine.
CACHE_DIR = Path(os.environ.get("NTM_CHAIN_CACHE", Path.home() / ".cache" / "ntm-seeded-chains"))
ANVIL_LOAD_TIMEOUT_S = 120.0  # loading ~240 MB of state for 100k records
REGISTER_BATCH = keys.keccak(b"registerBatch((address,uint64,bool,bytes32,bytes32)[])")[:4]
REGISTERED_TOPIC = "0x" + keys.keccak(b"NodeRegistered(address,address,uint64)").hex()


def _word(value: int) -> bytes:
    return value.to_bytes(32)


def signed_records(n: int, dc: bytes, domain: Domain, timestamp_ms: int) -> list[tuple[NodeTransaction, bytes]]:
    """`n` records of fresh node keys naming `dc`, each signed by its node."""
    out = []
    for _ in range(n):
        key = keys.generate()
        rec = NodeTransaction(keys.node_id_of(key), dc, timestamp_ms)
        out.append((rec, keys.sign_digest(key, rec.digest(domain))))
    return out


def batch_calldata(n: int, dc: bytes, domain: Domain, timestamp_ms: int) -> bytes:
    """`registerBatch` calldata of `n` fresh node-signed records: the ABI of an array of static
    tuples (node, timestamp, revoked, r, yParity|s), five words per record."""
    words = [REGISTER_BATCH, _word(32), _word(n)]
    for rec, sig in signed_records(n, dc, domain, timestamp_ms):
        r, vs = to_compact(sig)
        words += [rec.node.rjust(32, b"\0"), _word(rec.timestamp), _word(rec.revoked), r, vs]
    return b"".join(words)


class _Rpc:
    """Raw JSON-RPC over one kept connection: no web3 formatting of 500 logs per receipt."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url

    async def __call__(self, method: str, *params):
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}
        async with self.http.post(self.url, json=body) as r:
            reply = await r.json()
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def receipt(self, tx_hash: str) -> dict:
        """The receipt of `tx_hash`. A transaction still pending after RECEIPT_NUDGE_S gets one
        block mined on request (seen once: the last of six batches left in anvil's pool, no block
        after it); one the chain does not know is an error that says so."""
        start = time.monotonic()
        nudged = False
        while (got := await self("eth_getTransactionReceipt", tx_hash)) is None:
            waited = time.monotonic() - start
            if waited > RECEIPT_NUDGE_S and not nudged:
                nudged = True
                if await self("eth_getTransactionByHash", tx_hash) is None:
                    raise RuntimeError(f"seeding transaction {tx_hash} is not known to the chain")
                await self("evm_mine")
            if waited > RECEIPT_TIMEOUT_S:
                raise TimeoutError(f"seeding transaction {tx_hash} not mined in {RECEIPT_TIMEOUT_S} s")
            await asyncio.sleep(RECEIPT_POLL_S)
        return got


async def seed(rpc_url: str, registry_address: bytes, n: int, per_tx: int = RECORDS_PER_TX) -> bytes:
    """Put `n` records on chain (admitting the seeding DC first, once); the seeding DC's address."""
    seeder = keys.node_id_of(keys.private_key(SEED_KEY))
    async with await Registry.connect(rpc_url, registry_address, DEV_KEYS[0]) as owner:
        if await owner.dc(seeder) is None:
            await owner.admit_dc(seeder, "seed", "http://127.0.0.1:9")
        domain = owner.domain
    sizes = [min(per_tx, n - i) for i in range(0, n, per_tx)]
    now_ms = int(time.time() * 1000)
    account = Account.from_key(SEED_KEY)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(TX_IN_FLIGHT)
    with ProcessPoolExecutor(min(SIGNING_WORKERS, len(sizes)) or 1, multiprocessing.get_context("fork")) as pool:
        calldata = [loop.run_in_executor(pool, batch_calldata, k, seeder, domain, now_ms) for k in sizes]
        async with aiohttp.ClientSession() as http:
            rpc = _Rpc(http, rpc_url)
            nonce = int(await rpc("eth_getTransactionCount", account.address, "pending"), 16)
            fees = fee_fields(int(await rpc("eth_gasPrice"), 16))

            async def mined(tx_hash: str, count: int) -> None:
                try:
                    got = await rpc.receipt(tx_hash)
                finally:
                    gate.release()
                stored = sum(1 for log in got["logs"] if log["topics"][0] == REGISTERED_TOPIC)
                assert got["status"] == "0x1" and stored == count, f"batch {tx_hash}: {stored} of {count} stored"

            waits = []
            for i, (count, data) in enumerate(zip(sizes, calldata)):
                tx = {
                    "to": keys.checksum(registry_address),
                    "data": await data,
                    "nonce": nonce + i,
                    "chainId": domain.chain_id,
                }
                tx.update(gas=BATCH_GAS_BASE + BATCH_GAS_PER_RECORD * count, **fees)
                await gate.acquire()
                raw = account.sign_transaction(tx).raw_transaction
                waits.append(asyncio.create_task(mined(await rpc("eth_sendRawTransaction", "0x" + raw.hex()), count)))
            await asyncio.gather(*waits)
    return seeder


def _cache_key(records: int) -> str:
    """What a cached chain depends on: the contract's code, anvil's state format, the record count."""
    version = subprocess.run([anvil_binary(), "--version"], capture_output=True, check=True).stdout
    h = hashlib.sha256(load_artifact()["bytecode"].encode() + version + str(records).encode())
    return h.hexdigest()[:16]


async def _build(records: int) -> tuple[bytes, bytes]:
    """A fresh chain with the registry and `records` records: (anvil's gzipped state, the registry's address)."""
    with Anvil() as chain:
        async with await Registry.deploy(chain.url, DEV_KEYS[0]) as reg:
            address = reg.address
        await seed(chain.url, address, records)
        state = await asyncio.to_thread(chain.rpc, "anvil_dumpState", timeout=ANVIL_LOAD_TIMEOUT_S)
    return bytes.fromhex(state.removeprefix("0x")), address


@contextlib.asynccontextmanager
async def seeded_chain(records: int) -> AsyncIterator[tuple[Anvil, bytes]]:
    """A running anvil holding a NodeRegistry (owned by DEV_KEYS[0]) and `records` seeded records,
    and the registry's address; built and cached on the first call (see the module docstring)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = _cache_key(records)
    cached, meta = CACHE_DIR / f"{key}.json.gz", CACHE_DIR / f"{key}.registry"
    if not (cached.exists() and meta.exists()):
        state, address = await _build(records)
        atomic_file.replace_file(meta, json.dumps({"registry": address.hex(), "records": records}).encode())
        atomic_file.replace_file(cached, state)
    address = bytes.fromhex(json.loads(meta.read_text())["registry"])
    with tempfile.TemporaryDirectory(prefix="ntm-seeded-") as tmp:
        state_file = Path(tmp) / "state.json"  # anvil's --load-state reads plain JSON only
        state_file.write_bytes(gzip.decompress(cached.read_bytes()))
        with Anvil(extra_args=["--load-state", str(state_file)], start_timeout=ANVIL_LOAD_TIMEOUT_S) as chain:
            yield chain, address

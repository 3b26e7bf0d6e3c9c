"""Drains the outbox onto the chain: each transaction carries everything pending.

Up to MAX_IN_FLIGHT transactions wait for their receipts at once; while they do, new registrations
pile up in the outbox and go together in the next one, so batching follows the chain's speed with
no timer to tune. A failed send leaves rows pending (they are durable) and is retried with
backoff; a record the chain refuses is settled by reading the chain, because "refused as stale"
also happens when our own earlier send landed just before a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from dc.store import OutboxItem, Store
from ntm.errors import NtmError
from ntm.registry import Registry, RegistryError

log = logging.getLogger("ntm.dc.submitter")

# Records per transaction: 200 × ~30k gas = 6M gas, well inside a 30M block gas limit.
BATCH_MAX = 200
# Retry delays after an RPC failure: quick first retry, capped so a dead chain is not hammered.
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0
# Transactions awaiting receipts at once: hides the send→receipt round trip (nonces are assigned
# locally in order), while a stuck chain still holds at most this many batches.
MAX_IN_FLIGHT = 3


class Submitter:
    def __init__(self, store: Store, registry: Registry) -> None:
        self.store = store
        self.registry = registry
        self._wake = asyncio.Event()
        self._waiters: dict[tuple[bytes, int], list[asyncio.Future]] = defaultdict(list)
        self._inflight: set[tuple[bytes, int]] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._delay = RETRY_MIN_S
        self.sent_tx = 0
        self.failures = 0

    def wake(self) -> None:
        self._wake.set()

    async def confirmed(self, node: bytes, timestamp: int) -> tuple[str, str | None, int | None, str | None]:
        """Wait until the outbox row is settled; returns (state, tx, block, reason)."""
        state = self.store.outbox_state(node, timestamp)
        if state is None or state[0] != "pending":
            return state
        fut = asyncio.get_running_loop().create_future()
        self._waiters[(node, timestamp)].append(fut)
        return await fut

    def _next_batch(self) -> list[OutboxItem]:
        rows = self.store.pending(BATCH_MAX + len(self._inflight))
        return [i for i in rows if (i.record.node, i.record.timestamp) not in self._inflight][:BATCH_MAX]

    async def run(self) -> None:
        while True:
            await self._slots.acquire()
            items = self._next_batch()
            if not items:
                self._slots.release()
                self._wake.clear()
                await self._wake.wait()
                continue
            keys_ = {(i.record.node, i.record.timestamp) for i in items}
            self._inflight |= keys_
            asyncio.create_task(self._batch(items, keys_))

    async def _batch(self, items: list[OutboxItem], keys_: set) -> None:
        """Send one batch and settle it; on failure wait, then let its rows be picked up again."""
        try:
            results = await self._submit(items)
        except (NtmError, OSError, asyncio.TimeoutError) as exc:
            self.failures += 1
            log.warning("chain submission failed (%s); retrying in %.1fs", exc, self._delay)
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, RETRY_MAX_S)
        else:
            self._delay = RETRY_MIN_S
            self.store.settle(results)
            for item, state, tx, block, reason in results:
                for fut in self._waiters.pop((item.record.node, item.record.timestamp), []):
                    if not fut.done():
                        fut.set_result((state, tx, block, reason))
        finally:
            self._inflight -= keys_
            self._slots.release()
            self.wake()

    async def _submit(self, items: list[OutboxItem]) -> list:
        try:
            res = await self.registry.register([(i.record, i.signature) for i in items])
        except RegistryError as exc:
            if len(items) != 1 or not getattr(exc, "reason", None):
                raise
            # A single record the contract reverted: settle it from chain state below.
            rejected, tx, block = {items[0].record.node}, None, None
        else:
            self.sent_tx += 1
            rejected, tx, block = set(res.rejected), "0x" + bytes(res.tx_hash).hex(), res.block_number
            log.info("tx %s block %s: %d records, %d rejected", tx, block, len(items), len(rejected))
        results = []
        for item in items:
            if item.record.node not in rejected:
                results.append((item, "confirmed", tx, block, None))
                continue
            onchain = await self.registry.lookup(item.record.node)
            if onchain and onchain.timestamp == item.record.timestamp and onchain.dc == item.record.dc:
                results.append((item, "confirmed", tx, block, "already on chain"))
            else:
                results.append((item, "rejected", tx, block, "superseded or refused on chain"))
        return results

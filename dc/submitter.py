"""Drains the outbox onto the chain: one transaction at a time, carrying everything pending.

While one transaction is in flight, new registrations pile up in the outbox and go together in
the next one, so batching follows the chain's speed with no timer to tune. A failed send leaves
rows pending (they are durable) and is retried with backoff; a record the chain refuses is settled
by reading the chain, because "refused as stale" also happens when our own earlier send landed just
before a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from dc.store import OutboxItem, Store
from ntm.errors import NtmError
from ntm.registry import RegistryError, RegistryView

log = logging.getLogger("ntm.dc.submitter")

# Records per transaction: 200 × ~30k gas = 6M gas, well inside a 30M block gas limit.
BATCH_MAX = 200
# Retry delays after an RPC failure: quick first retry, capped so a dead chain is not hammered.
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0


class Submitter:
    def __init__(self, store: Store, registry: RegistryView) -> None:
        self.store = store
        self.registry = registry
        self._wake = asyncio.Event()
        self._waiters: dict[tuple[bytes, int], list[asyncio.Future]] = defaultdict(list)
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

    async def run(self) -> None:
        delay = RETRY_MIN_S
        while True:
            items = self.store.pending(BATCH_MAX)
            if not items:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                results = await self._submit(items)
            except (NtmError, OSError, asyncio.TimeoutError) as exc:
                self.failures += 1
                log.warning("chain submission failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_MIN_S
            self.store.settle(results)
            for item, state, tx, block, reason in results:
                for fut in self._waiters.pop((item.record.node, item.record.timestamp), []):
                    if not fut.done():
                        fut.set_result((state, tx, block, reason))

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

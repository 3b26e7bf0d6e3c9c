"""Drains the outbox onto the chain: up to PIPELINE_DEPTH transactions in flight, each carrying
what is pending.

While transactions are in flight, new registrations pile up in the outbox and go together in
the next one, so batching follows the chain's speed with no timer to tune. The transactions
carry consecutive nonces (chain/registry.py); one whose nonce is lost behind a gap or a rollback
fails like a dropped one, and its rows, still pending, go in a later batch.

Only the chain decides, in a mined block: records go in `registerBatch` with a fixed gas limit, no
simulation first (on an idle chain a simulation runs against an old block and refuses what the
next block takes). Anything short of a mined verdict (an unreachable RPC, a dropped transaction,
a whole-transaction revert) leaves the rows pending (they are durable) and is retried with
backoff. A record refused as "too far in the future" is retried later too: the DC accepted it
inside the shared window (ntm/record.py), so only a validator's clock can be behind, and time
fixes that. A record refused otherwise is settled by reading the chain, because "stale" also
happens when our own earlier send landed just before a crash.

"Confirmed" means `confirmations` blocks deep (1 on anvil's instant blocks). After a rollback the
follower (dc/cache.py) calls `recheck(fork)`: confirmed rows from that block on whose record the
chain no longer has go back to pending and are sent again. A rollback is also what a chain node
killed and restarted from its state file looks like (its last blocks are gone, and it mines those
heights again): the hash of the block our transaction lands in is compared with the one remembered
for that height before it is taken (`RegistryCache.remember`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Callable

from chain.registry import BATCH_GAS_BASE, BATCH_GAS_PER_RECORD
from dc.cache import RegistryCache
from dc.store import OutboxItem, Store
from ntm.clock import SYSTEM, Clock
from ntm.errors import NtmError
from ntm.registry import RegistryError, RegistryView

log = logging.getLogger("ntm.dc.submitter")

# registerBatch transactions in flight at once (consecutive nonces): together they fill one block,
# so a DC puts ~660 records in each 30M-gas block instead of 200 (issue 30); more in flight would
# only wait for the next block.
PIPELINE_DEPTH = 4
# Records per transaction: as many as PIPELINE_DEPTH transactions' gas limits (BATCH_GAS_BASE +
# BATCH_GAS_PER_RECORD each, chain/registry.py) fit in the latest block's gas limit (165 at 30M);
# BATCH_MAX while the head is not known, and at most BATCH_CAP (a receipt's logs to parse).
BATCH_MAX = 200
BATCH_CAP = 1000
# Retry delays after an RPC failure: quick first retry, capped so a dead chain is not hammered.
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0
# A record the chain found "too far in the future" is sent again after this (validator clock lag).
FUTURE_RETRY_S = 5.0
FUTURE_REASON = "NodeRegistry: timestamp too far in future"
# How often the depth of a mined transaction is looked at while waiting for confirmations.
DEPTH_POLL_S = 0.05

Outcome = tuple[OutboxItem, str, str | None, int | None, str | None]


def batch_size(block_gas_limit: int) -> int:
    """Records per registerBatch so that PIPELINE_DEPTH of them fit one block (0: not known)."""
    if block_gas_limit <= 0:
        return BATCH_MAX
    per_tx = block_gas_limit // PIPELINE_DEPTH - BATCH_GAS_BASE
    return max(1, min(BATCH_CAP, per_tx // BATCH_GAS_PER_RECORD))


class Submitter:
    def __init__(
        self,
        store: Store,
        registry: RegistryView,
        cache: RegistryCache,
        confirmations: int = 1,
        clock: Clock = SYSTEM,
        observe_lag: Callable[[float], None] = lambda s: None,
    ) -> None:
        """`observe_lag(seconds)`: each confirmed record's time from durable to confirmed."""
        self.clock, self.observe_lag = clock, observe_lag
        self.durable_at: dict[tuple[bytes, int], float] = {}  # records made durable since this process started
        if confirmations < 1:
            raise ValueError("confirmations must be at least 1")
        self.store = store
        self.registry = registry
        self.cache = cache
        self.confirmations = confirmations
        self._wake = asyncio.Event()
        self._waiters: dict[tuple[bytes, int], list[asyncio.Future]] = defaultdict(list)
        self.sent_tx = 0
        self.failures = 0
        self.reopened = 0  # confirmed rows sent again after a rollback
        self._in_flight: set[bytes] = set()  # nodes with rows in a batch in flight
        self._in_flight_rows = 0
        self._delay = RETRY_MIN_S  # the next backoff after a failed submission

    def note_durable(self, node: bytes, timestamp: int) -> None:
        self.durable_at[(node, timestamp)] = self.clock.now()

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
        """Keep up to PIPELINE_DEPTH batches in flight (consecutive nonces, chain/registry.py):
        a new batch takes pending rows of nodes with nothing in flight, so one node's records
        reach the chain in order, each batch carrying what piled up meanwhile."""
        batches: set[asyncio.Task] = set()
        while True:
            items = self._next_batch() if len(batches) < PIPELINE_DEPTH else []
            if items:
                self._in_flight.update(i.record.node for i in items)
                batches.add(asyncio.create_task(self._send(items)))
                continue
            self._wake.clear()
            wake = asyncio.create_task(self._wake.wait())
            try:
                await asyncio.wait({wake, *batches}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                for t in batches:
                    t.cancel()
                raise
            finally:
                wake.cancel()
            batches = {t for t in batches if not t.done()}

    def _next_batch(self) -> list[OutboxItem]:
        """Up to batch_size() pending rows, none of a node with a batch in flight (its rows in
        flight are still pending in the store: looked past, at most PIPELINE_DEPTH × BATCH_CAP)."""
        size = batch_size(self.cache.head.gas_limit if self.cache.head else 0)
        rows = self.store.pending(size + self._in_flight_rows)
        return [i for i in rows if i.record.node not in self._in_flight][:size]

    async def _send(self, items: list[OutboxItem]) -> None:
        """One batch: submit and settle it, or on failure back off (shared by the pipeline: a dead
        chain is retried at RETRY_MAX_S at most PIPELINE_DEPTH times over); its rows free again
        (pending ones to be sent anew) once it is done."""
        self._in_flight_rows += len(items)
        try:
            try:
                results, deferred = await self._submit(items)
            except (NtmError, OSError, asyncio.TimeoutError) as exc:
                self.failures += 1
                log.warning("chain submission failed (%s); retrying in %.1fs", exc, self._delay)
                delay, self._delay = self._delay, min(self._delay * 2, RETRY_MAX_S)
                await asyncio.sleep(delay)
                return
            self._delay = RETRY_MIN_S
            self.store.settle(results)
            for item, state, tx, block, reason in results:
                for fut in self._waiters.pop((item.record.node, item.record.timestamp), []):
                    if not fut.done():
                        fut.set_result((state, tx, block, reason))
            if deferred:
                log.warning(
                    "%d records refused as too far in the future (a validator clock behind?); sending again in %.0f s",
                    deferred,
                    FUTURE_RETRY_S,
                )
                await asyncio.sleep(FUTURE_RETRY_S)
        finally:
            self._in_flight_rows -= len(items)
            self._in_flight.difference_update(i.record.node for i in items)
            self.wake()

    async def _submit(self, items: list[OutboxItem]) -> tuple[list[Outcome], int]:
        """Send `items`, wait for the depth, and judge each: (settled outcomes, how many deferred)."""
        res = await self.registry.submit([(i.record, i.signature) for i in items])
        self.sent_tx += 1
        tx, block = "0x" + bytes(res.tx_hash).hex(), res.block_number
        if self.cache.remember(block, res.block_hash):  # else a rollback: the old hash stays in both
            self.store.remember_block(block, res.block_hash)
        log.info("tx %s block %s: %d records, %d rejected", tx, block, len(items), len(res.rejected))
        await self._wait_depth(res.tx_hash, block)
        why = dict(zip(res.rejected, res.reasons))
        results: list[Outcome] = []
        deferred = 0
        for item in items:
            reason = why.get(item.record.node)
            if item.record.node not in why:
                results.append((item, "confirmed", tx, block, None))
                continue
            onchain = await self.registry.lookup(item.record.node)
            if onchain and onchain.timestamp == item.record.timestamp and onchain.dc == item.record.dc:
                results.append((item, "confirmed", tx, block, "already on chain"))
            elif reason == FUTURE_REASON:
                deferred += 1
            else:
                results.append((item, "rejected", tx, block, reason or "superseded or refused on chain"))
        for item, state, *_ in results:
            since = self.durable_at.pop((item.record.node, item.record.timestamp), None)
            if since is not None and state == "confirmed":
                self.observe_lag(self.clock.now() - since)
        return results, deferred

    async def _wait_depth(self, tx_hash: bytes, block: int) -> None:
        """Return once the transaction is `confirmations` blocks deep; RegistryError if a reorg
        took it out meanwhile (its records are then still pending and sent again)."""
        if self.confirmations == 1:
            return
        while True:
            head = self.cache.head.number if self.cache.head else -1
            if head >= block + self.confirmations - 1:
                break
            await asyncio.sleep(DEPTH_POLL_S)
        now = await self.registry.mined(tx_hash)
        if now is None:
            raise RegistryError(f"transaction 0x{tx_hash.hex()} was reorganised out of the chain; sending again")

    async def recheck(self, fork: int) -> None:
        """After a rollback from block `fork` on: rows confirmed there whose record the chain
        (the rebuilt cache) no longer holds go back to pending; the registry forgets its nonce."""
        self.registry.forget_nonce()
        self.store.forget_blocks(fork)  # hashes of the lost blocks: a restart would see this rollback again
        gone = [
            item
            for item in self.store.confirmed_since(fork)
            if (rec := self.cache.home_of(item.record.node)) is None or rec.timestamp < item.record.timestamp
        ]
        if gone:
            self.store.reopen(gone)
            self.reopened += len(gone)
            log.warning(
                "rollback from block %d: %d confirmed records are no longer on chain; sending them again",
                fork,
                len(gone),
            )
            self.wake()

"""The DC's in-memory view of the registry, fed by contract events, and its follower of the chain.

Lookups ("where is node X", "is DC Y active") read this cache and never wait for the chain, so
signaling latency does not depend on the chain's, and a chain that is down leaves them working.
Events are applied in chain order; a record is replaced only by a newer timestamp, mirroring the
contract.

The follower polls the head and remembers the hash of the blocks it has read up to. A remembered
height whose hash changed, or a head below it, is a rollback (a reorg, or a chain node restarted
from an older state): the cache is rebuilt from the chain as it is now, and `on_rollback(fork)` is
told the first block that changed, so the DC can re-check what it called confirmed since.

Until the follower has read up to the head once (`caught_up`), the cache is incomplete: the DC
reports unhealthy and a lookup it cannot answer says "catching up" (retry), never "unknown node".
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable

from dc import snapshot
from dc.snapshot import Snapshot
from ntm.clock import SYSTEM, Clock
from ntm.errors import NtmError
from ntm.registry import BlockRef, DcInfo, OnChainRecord, RegistryEvent, RegistryView

log = logging.getLogger("ntm.dc.cache")

# A node missing from the cache may have been registered after the last event the cache applied
# (the follower polls the chain every ~50 ms): a lookup waits this long for its event instead of
# asking the chain, so an unknown ID costs no RPC (an outsider cannot use the DC as an amplifier
# of chain calls, docs/PROTOCOL.md §5).
MISS_WAIT_S = 0.3
# At most this many lookups wait at once; beyond that a miss is answered from the cache at once
# (bounded memory under a flood of random IDs).
MAX_WAITING_MISSES = 64
# Head polls: 50 ms keeps a new record's event within a poll of its block (MISS_WAIT_S above).
POLL_S = 0.05
# After an RPC failure the poll backs off to this (a dead chain is not hammered).
POLL_BACKOFF_MAX_S = 5.0
# The latest block's hash and timestamp are read again at least this often even when its number
# has not moved (a reorg at the same height; the block age for /healthz); in between a poll is
# one eth_blockNumber.
HEAD_REFRESH_S = 1.0
# Blocks read per eth_getLogs: clients cap the range (Besu's default is 1,000, some 2,000).
LOG_CHUNK = 1000
# Heights whose hash is remembered for reorg detection: one per poll that read new blocks. A
# rollback deeper than all of them re-checks everything since the deployment block.
REMEMBERED_BLOCKS = 1024


class RegistryCache:
    def __init__(self, registry: RegistryView, from_block: int = 0, clock: Clock = SYSTEM) -> None:
        self.registry, self.clock = registry, clock
        self.from_block = from_block
        self.nodes: dict[bytes, OnChainRecord] = {}
        self.dcs: dict[bytes, DcInfo] = {}
        # not revoked records per home DC, kept as events apply (the dashboard reads it: no walk)
        self.live_per_dc: dict[bytes, int] = {}
        self.block = from_block - 1  # read up to here
        self.head: BlockRef | None = None  # the chain's latest block at the last successful poll
        self.head_seen_at: float | None = None  # clock.now() of the last poll the chain answered
        self._head_read_at = 0.0
        self.rollbacks = 0
        self.ready = asyncio.Event()  # set once read up to the head: a miss then means "not registered"
        self._hashes: dict[int, bytes] = {}  # height -> hash, of blocks read up to
        self._changed = asyncio.Condition()
        # Called with a node ID when a revocation of it arrives from the chain (the DC ends the
        # node's session here at once).
        self.on_revoked: Callable[[bytes], object] | None = None
        # Awaited with the first changed block after the cache was rebuilt for a rollback.
        self.on_rollback: Callable[[int], Awaitable[None]] | None = None
        self._waiting = 0

    async def load(self) -> None:
        """Prime the DC list directly (so a DC can trust its peers before events catch up)."""
        for info in await self.registry.dcs():
            self.dcs[info.address] = info

    async def restore(self, snap: Snapshot) -> bool:
        """Start from a snapshot (dc/snapshot.py) if the chain still has its block: the follower
        then reads only the logs after it. False (and the cache unchanged) if it does not."""
        now = await self.registry.block(snap.block)
        if now is None or now.hash != snap.block_hash:
            log.warning(
                "registry snapshot at block %d discarded: %s; reading the registry from block %d",
                snap.block,
                "the chain is shorter" if now is None else "the chain has another block there",
                self.from_block,
            )
            return False
        self.nodes, self.dcs, self.live_per_dc = snap.nodes, snap.dcs, {}
        for rec in self.nodes.values():  # once per start
            self._count(rec, 1)
        self._advance(now)
        log.info("registry snapshot at block %d restored: %d nodes, %d DCs", snap.block, len(self.nodes), len(self.dcs))
        return True

    def snapshot(self) -> Snapshot | None:
        """The cache as it is now (copied: the follower goes on), or None before the first catch-up."""
        if not self.caught_up or self.block not in self._hashes:
            return None
        return Snapshot(
            self.registry.chain_id,
            self.registry.address,
            self.from_block,
            self.block,
            self._hashes[self.block],
            dict(self.nodes),
            dict(self.dcs),
        )

    async def keep_snapshot(self, path: Path) -> None:
        """Write the snapshot every SNAPSHOT_EVERY_S when the cache has read new blocks."""
        written = None
        while True:
            await asyncio.sleep(snapshot.SNAPSHOT_EVERY_S)
            snap = self.snapshot()
            if snap is not None and snap.block != written and await snapshot.save(path, snap):
                written = snap.block

    def is_active_dc(self, address: bytes) -> bool:
        info = self.dcs.get(address)
        return bool(info and info.active)

    def home_of(self, node: bytes) -> OnChainRecord | None:
        return self.nodes.get(node)

    async def resolve(self, node: bytes) -> OnChainRecord | None:
        """Like home_of, but a miss waits up to MISS_WAIT_S for the node's event: a node
        registered in the last poll interval is not "unknown". Never calls the chain."""
        rec = self.nodes.get(node)
        if rec is None and self._waiting < MAX_WAITING_MISSES:
            self._waiting += 1
            try:
                await self.wait_for(lambda: node in self.nodes, MISS_WAIT_S)
            finally:
                self._waiting -= 1
            rec = self.nodes.get(node)
        return rec

    async def run(self) -> None:
        """Follow the chain forever; RPC failures are retried with backoff (lookups go on)."""
        delay = POLL_S
        while True:
            try:
                caught_up = await self.poll()
            except (NtmError, OSError, asyncio.TimeoutError) as exc:
                if delay == POLL_S:
                    log.warning("chain unreachable (%s): serving from the cache, retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, POLL_BACKOFF_MAX_S)
                continue
            if delay != POLL_S:
                log.info("chain reachable again at block %d", self.head.number if self.head else -1)
            delay = POLL_S
            if caught_up:
                await asyncio.sleep(POLL_S)

    async def poll(self) -> bool:
        """One step: read the head, handle a rollback, apply the next chunk of events.
        Returns True when caught up with the head."""
        number = await self.registry.block_number()
        now = self.clock.now()
        if (
            self.head is not None
            and number == self.head.number == self.block
            and now - self._head_read_at < HEAD_REFRESH_S
        ):
            self.head_seen_at = now
            return True
        head = await self.registry.head()
        self.head, self.head_seen_at, self._head_read_at = head, now, now
        fork = await self._fork_point(head)
        if fork is not None:
            await self._rebuild(head, fork)
            return self._at_head()
        if head.number <= self.block:
            return self._at_head()
        to = min(head.number, self.block + LOG_CHUNK)
        events = await self.registry.get_events(self.block + 1, to)
        end = head if to == head.number else await self.registry.block(to)
        if end is None:  # the block vanished between the two calls: a reorg, seen next poll
            return False
        for ev in events:
            self.apply(ev)
        self._advance(end)
        async with self._changed:
            self._changed.notify_all()
        return self._at_head() if to == head.number else False

    @property
    def caught_up(self) -> bool:
        return self.ready.is_set()

    def _at_head(self) -> bool:
        if not self.caught_up:
            log.info(
                "registry cache caught up at block %d: %d nodes, %d DCs", self.block, len(self.nodes), len(self.dcs)
            )
            self.ready.set()
        return True

    def _advance(self, end: BlockRef) -> None:
        self.block = end.number
        self.remember(end.number, end.hash)

    def remember(self, number: int, block_hash: bytes) -> bool:
        """Watch this block for a rollback: the follower's own reads, and the blocks our
        transactions were mined in (which the follower may not have read when the chain fails).

        A height already remembered with another hash was mined again: the chain lost blocks (a
        chain node killed and restarted from its state file, a reorg). The old hash is kept, so the
        next poll finds the fork there; taking the new one would hide it (records we called
        confirmed in the lost block would stay "confirmed"). Returns False then."""
        known = self._hashes.get(number)
        if known is not None and known != block_hash:
            log.warning("block %d has a new hash: the chain lost blocks; looking for the fork", number)
            self._head_read_at = float("-inf")  # the next poll reads the head and compares at once
            return False
        self._hashes[number] = block_hash
        while len(self._hashes) > REMEMBERED_BLOCKS:
            del self._hashes[min(self._hashes)]
        return True

    async def _fork_point(self, head: BlockRef) -> int | None:
        """None if the blocks read so far are still the chain's; else the first block that changed."""
        if not self._hashes:
            return None
        top = max(self._hashes)
        if head.number == top and head.hash == self._hashes[top]:
            return None
        if head.number > top:
            now = await self.registry.block(top)
            if now is not None and now.hash == self._hashes[top]:
                return None
        for height in sorted(self._hashes, reverse=True):  # newest first: the usual reorg is shallow
            if height > head.number:
                continue
            now = await self.registry.block(height)
            if now is not None and now.hash == self._hashes[height]:
                return height + 1
        return self.from_block

    async def _rebuild(self, head: BlockRef, fork: int) -> None:
        """Replace the cache with the chain's state at `head` (read first, swapped at once)."""
        log.warning(
            "chain rollback: blocks from %d changed (head now %d, had read up to %d); rebuilding the registry cache",
            fork,
            head.number,
            self.block,
        )
        dcs = await self.registry.dcs()
        events: list[RegistryEvent] = []
        for start in range(self.from_block, head.number + 1, LOG_CHUNK):
            events += await self.registry.get_events(start, min(head.number, start + LOG_CHUNK - 1))
        self.nodes, self.dcs, self._hashes, self.live_per_dc = {}, {info.address: info for info in dcs}, {}, {}
        on_revoked, self.on_revoked = self.on_revoked, None  # revocations still on chain were handled
        try:
            for ev in events:
                self.apply(ev)
        finally:
            self.on_revoked = on_revoked
        self._advance(head)
        self.rollbacks += 1
        if self.on_rollback is not None:
            await self.on_rollback(fork)
        async with self._changed:
            self._changed.notify_all()

    def apply(self, ev: RegistryEvent) -> None:
        if ev.kind in ("NodeRegistered", "NodeRevoked"):
            assert ev.node is not None and ev.dc is not None and ev.timestamp is not None
            old = self.nodes.get(ev.node)
            if old is None or ev.timestamp > old.timestamp:
                new = self.nodes[ev.node] = OnChainRecord(ev.dc, ev.timestamp, ev.kind == "NodeRevoked")
                self._count(old, -1)
                self._count(new, 1)
            if ev.kind == "NodeRevoked" and self.on_revoked is not None:
                self.on_revoked(ev.node)
        elif ev.kind in ("DCAdmitted", "DCUpdated"):
            assert ev.dc is not None
            self.dcs[ev.dc] = DcInfo(ev.dc, True, ev.hostname or "", ev.endpoint or "")
        elif ev.kind == "DCRemoved":
            assert ev.dc is not None
            old = self.dcs.get(ev.dc)
            self.dcs[ev.dc] = DcInfo(ev.dc, False, old.hostname if old else "", old.endpoint if old else "")

    def _count(self, rec: OnChainRecord | None, delta: int) -> None:
        if rec is not None and not rec.revoked:
            self.live_per_dc[rec.dc] = self.live_per_dc.get(rec.dc, 0) + delta

    async def wait_for(self, predicate, timeout: float) -> bool:
        """Wait until predicate() holds (e.g. a node's record arrived); False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
                return True
            except asyncio.TimeoutError:
                return predicate()

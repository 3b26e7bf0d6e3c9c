"""The DC's in-memory view of the registry, fed by contract events.

Lookups ("where is node X", "is DC Y active") read this cache and never wait for the chain, so
signaling latency does not depend on the chain's. Events are applied in chain order; a record is
replaced only by a newer timestamp, mirroring the contract.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ntm.registry import DcInfo, OnChainRecord, RegistryView

log = logging.getLogger("ntm.dc.cache")

# A node missing from the cache may have been registered after the last event the cache applied
# (the follower polls the chain every ~50 ms): a lookup waits this long for its event instead of
# asking the chain, so an unknown ID costs no RPC (an outsider cannot use the DC as an amplifier
# of chain calls, docs/PROTOCOL.md §5).
MISS_WAIT_S = 0.3
# At most this many lookups wait at once; beyond that a miss is answered from the cache at once
# (bounded memory under a flood of random IDs).
MAX_WAITING_MISSES = 64


class RegistryCache:
    def __init__(self, registry: RegistryView, from_block: int = 0) -> None:
        self.registry = registry
        self.from_block = from_block
        self.nodes: dict[bytes, OnChainRecord] = {}
        self.dcs: dict[bytes, DcInfo] = {}
        self.block = -1
        self._changed = asyncio.Condition()
        # Called with a node ID when a revocation of it arrives from the chain (the DC ends the
        # node's session here at once).
        self.on_revoked: Callable[[bytes], object] | None = None
        self._waiting = 0

    async def load(self) -> None:
        """Prime the DC list directly (so a DC can trust its peers before events catch up)."""
        for info in await self.registry.dcs():
            self.dcs[info.address] = info

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
        async for ev in self.registry.events(self.from_block):
            self.apply(ev)
            async with self._changed:
                self._changed.notify_all()

    def apply(self, ev) -> None:
        if ev.kind in ("NodeRegistered", "NodeRevoked"):
            old = self.nodes.get(ev.node)
            if old is None or ev.timestamp > old.timestamp:
                self.nodes[ev.node] = OnChainRecord(ev.dc, ev.timestamp, ev.kind == "NodeRevoked")
            if ev.kind == "NodeRevoked" and self.on_revoked is not None:
                self.on_revoked(ev.node)
        elif ev.kind in ("DCAdmitted", "DCUpdated"):
            self.dcs[ev.dc] = DcInfo(ev.dc, True, ev.hostname, ev.endpoint)
        elif ev.kind == "DCRemoved":
            old = self.dcs.get(ev.dc)
            self.dcs[ev.dc] = DcInfo(ev.dc, False, old.hostname if old else "", old.endpoint if old else "")
        self.block = max(self.block, ev.block)

    async def wait_for(self, predicate, timeout: float) -> bool:
        """Wait until predicate() holds (e.g. a node's record arrived); False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
                return True
            except asyncio.TimeoutError:
                return predicate()

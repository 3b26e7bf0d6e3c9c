"""Which DCs the relay obeys: the active DCs of the NodeRegistry, kept current by chain events.

Loaded once at start (`getDCs`), then every DCAdmitted / DCUpdated / DCRemoved event is applied,
as a DC's registry cache does for nodes. Checking a Relay Direction's signer is a set lookup:
no chain call per request, so a stranger signing with fresh keys cannot make the relay an
amplifier of chain RPC, and a DC removed on chain loses its say within one event poll.
"""

from __future__ import annotations

import logging

from ntm import keys
from ntm.registry import RegistryEvent, RegistryView

log = logging.getLogger("ntm.rs.trust")

DC_EVENTS = ("DCAdmitted", "DCUpdated", "DCRemoved")


class DcTrust:
    """`trust.is_active(addr)`: is `addr` an active DC in the registry (as of the last event)?"""

    def __init__(self) -> None:
        self.active: set[bytes] = set()
        self.block = -1  # the newest block whose DC events are applied

    async def load(self, registry: RegistryView) -> None:
        for info in await registry.dcs():
            if info.active:
                self.active.add(info.address)

    def apply(self, ev: RegistryEvent) -> None:
        if ev.kind in ("DCAdmitted", "DCUpdated") and ev.dc is not None:
            self.active.add(ev.dc)
        elif ev.kind == "DCRemoved" and ev.dc is not None:
            self.active.discard(ev.dc)
            log.info("DC %s removed on chain: its relay directions are refused", keys.checksum(ev.dc))
        self.block = max(self.block, ev.block)

    async def follow(self, registry: RegistryView, from_block: int) -> None:
        """Apply the registry's DC events from `from_block` on, forever (run as a task)."""
        async for ev in registry.events(from_block, kinds=DC_EVENTS):
            self.apply(ev)

    def is_active(self, addr: bytes) -> bool:
        return addr in self.active

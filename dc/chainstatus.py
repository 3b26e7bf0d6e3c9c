"""Whether the DC's chain is usable, for /healthz: reachable, caught up, and the DC able to pay.

A DC with its chain down keeps serving (signaling from the registry cache, registrations stored
durably and sent later), but it is not "ok", and its health says why, so an operator (or a
container orchestrator) sees it. The head and the follower's progress come from dc/cache.py; the
gas balance is polled here, rarely, since it changes only when the DC sends.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from dc.cache import RegistryCache
from ntm.clock import SYSTEM, Clock
from ntm.errors import NtmError
from ntm.registry import RegistryView

log = logging.getLogger("ntm.dc.chain")

# The chain is "down" when no head poll has succeeded for this long (polls run every 50 ms and
# back off to 5 s on errors, so this is two backed-off attempts).
CHAIN_DOWN_S = 10.0
# The follower is "behind" when it has this many blocks left to read (it reads 1,000 per poll).
BEHIND_BLOCKS = 2000
# Gas balance is "low" below what this many new-node registrations cost at the current gas price:
# a day of the default budget (NEW_NODES_PER_HOUR=1000) is 24,000; an hour's worth warns early enough.
LOW_GAS_RECORDS = 1000
# How often the balance is read.
BALANCE_POLL_S = 15.0


@dataclass
class ChainStatus:
    cache: RegistryCache
    registry: RegistryView
    gas_per_record: int
    max_block_age_s: float = 0.0  # 0: the chain makes blocks only on demand (anvil): age means nothing
    clock: Clock = SYSTEM
    balance_wei: int | None = None
    gas_price_wei: int | None = None

    async def run(self) -> None:
        while True:
            try:
                self.balance_wei, self.gas_price_wei = await self.registry.balance()
            except (NtmError, OSError, asyncio.TimeoutError) as exc:
                log.debug("balance poll failed: %s", exc)
            await asyncio.sleep(BALANCE_POLL_S)

    def low_gas_threshold(self) -> int | None:
        return None if self.gas_price_wei is None else LOW_GAS_RECORDS * self.gas_per_record * self.gas_price_wei

    def report(self) -> dict:
        """{"chain": "ok"|"down"|"catching_up"|"behind", "gas": "ok"|"low"|"unknown", and the figures behind them}."""
        now, wall = self.clock.now(), self.clock.wall()
        head, seen = self.cache.head, self.cache.head_seen_at
        age = None if head is None else max(0.0, wall - head.timestamp)
        if head is None or seen is None or now - seen > CHAIN_DOWN_S:
            chain = "down"
        elif not self.cache.caught_up:  # the first full read of the registry is not done: not ready
            chain = "catching_up"
        elif head.number - self.cache.block > BEHIND_BLOCKS or (
            self.max_block_age_s > 0 and age is not None and age > self.max_block_age_s
        ):
            chain = "behind"
        else:
            chain = "ok"
        threshold = self.low_gas_threshold()
        if self.balance_wei is None or threshold is None:
            gas = "unknown"
        else:
            gas = "low" if self.balance_wei < threshold else "ok"
        return {
            "chain": chain,
            "head": head.number if head else None,
            "read_to": self.cache.block,
            "block_age_s": None if age is None else round(age, 1),
            "gas": gas,
            "gas_balance_wei": self.balance_wei,
            "gas_low_below_wei": threshold,
        }

"""Token buckets: how much of something a party may have, refilled over time. Pure: the caller
passes `now` (monotonic seconds).

    b = TokenBucket(rate=0.5, burst=4)        # 4 at once, then one per 2 s
    if not b.take(now): refuse()
    per_peer = Buckets(rate=0.5, burst=4, max_keys=1024)   # one bucket per key, bounded memory
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float = float("-inf")) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if there are that many (after refilling up to `burst`)."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class Buckets:
    """One TokenBucket per key; at most `max_keys` kept (the least recently used is forgotten,
    which only ever gives a forgotten key a fresh burst)."""

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def take(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return b.take(now, cost)

    def __len__(self) -> int:
        return len(self._buckets)

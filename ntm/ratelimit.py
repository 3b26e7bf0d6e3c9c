"""Token buckets: how much of something a party may have, refilled over time. Pure: the caller
passes `now` (monotonic seconds).

    b = TokenBucket(rate=0.5, burst=4)        # 4 at once, then one per 2 s
    if not b.take(now): refuse()
    per_peer = Buckets(rate=0.5, burst=4, max_keys=1024)   # one bucket per key, bounded memory
    shared = FairShare(per_key=(0.5, 8), total=(16, 64), reserve=32, max_keys=4096)  # a crowd can't starve a newcomer
    sybil = RisingCost(rate=16 / 3600, burst=16, half_life_s=3600, max_keys=10_000)   # 1, 2, 4, 8 … per key
    held = Concurrency(limit=8)                # at most 8 at once per key
    key = source_prefix("203.0.113.7")         # "203.0.113.0/24": one network, one key
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from typing import Hashable

from ntm.addr import unmapped

# A source network, for limits on what outsiders may do: one IPv4 /24 or one IPv6 /56 (the usual
# home or office allocation) is one source, so a host cannot dodge a limit by hopping addresses.
SOURCE_PREFIX_V4 = 24
SOURCE_PREFIX_V6 = 56


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float = float("-inf")) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = now

    def available(self, now: float) -> float:
        """The tokens there are now (refilled up to `burst`)."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if there are that many (after refilling up to `burst`)."""
        if self.available(now) >= cost:
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

    def tokens(self, key: Hashable, now: float) -> float:
        """What `key` could spend now (a key never seen: the full burst); changes nothing."""
        b = self._buckets.get(key)
        if b is None:
            return self.burst
        return min(self.burst, b.tokens + max(0.0, now - b.stamp) * self.rate)

    def __len__(self) -> int:
        return len(self._buckets)


class FairShare:
    """A shared budget that a crowd of busy keys cannot drain for the others. Each key has its own
    bucket (`per_key`), spent by every ask, granted or not, and draws on the shared one (`total`);
    a key whose own bucket was below `per_key` burst − 1 (it asked more than once lately) may only
    take shared tokens above `reserve`, which is thus kept for keys that asked at most once: a
    legitimate peer that opens one tunnel still gets through while many identities flood at
    their own full rate."""

    def __init__(self, per_key: tuple[float, float], total: tuple[float, float], reserve: float,
                 max_keys: int) -> None:
        self.keys = Buckets(*per_key, max_keys=max_keys)
        self.shared = TokenBucket(*total)
        self.reserve = reserve

    def take(self, key: Hashable, now: float) -> bool:
        light = self.keys.tokens(key, now) >= self.keys.burst - 1.0
        if not self.keys.take(key, now):
            return False
        if self.shared.available(now) - 1.0 < (0.0 if light else self.reserve):
            return False
        return self.shared.take(now)


class RisingCost:
    """Each new thing one key takes costs twice the one before (1, 2, 4, 8 … tokens of its own
    bucket), the count halving at each whole `half_life_s`: a few at once are cheap, a source that takes
    many slows down exponentially, so one actor cannot spend a budget shared with everyone."""

    def __init__(self, rate: float, burst: float, half_life_s: float, max_keys: int) -> None:
        self.buckets = Buckets(rate, burst, max_keys)
        self.half_life_s = half_life_s
        self.max_keys = max_keys
        self._counts: OrderedDict[Hashable, tuple[int, float]] = OrderedDict()  # key → (count, since when)

    def _count(self, key: Hashable, now: float) -> tuple[int, float]:
        """Things `key` took, halved once per whole half-life since `stamp`, and the new stamp."""
        count, stamp = self._counts.get(key, (0, now))
        halvings = int((now - stamp) // self.half_life_s)
        return count >> min(halvings, 63), stamp + halvings * self.half_life_s

    def cost(self, key: Hashable, now: float) -> float:
        """What the next one costs `key` (changes nothing)."""
        return float(1 << self._count(key, now)[0])

    def take(self, key: Hashable, now: float) -> bool:
        if not self.buckets.take(key, now, self.cost(key, now)):
            return False
        count, stamp = self._count(key, now)
        self._counts.pop(key, None)
        self._counts[key] = (count + 1, stamp)
        if len(self._counts) > self.max_keys:
            self._counts.popitem(last=False)
        return True


class Concurrency:
    """At most `limit` held at once per key (sockets waiting to authenticate, per address). Memory
    is bounded by what is held: a key holding nothing is forgotten."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[Hashable] = Counter()

    def acquire(self, key: Hashable) -> bool:
        if self._held[key] >= self.limit:
            return False
        self._held[key] += 1
        return True

    def release(self, key: Hashable) -> None:
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]

    def held(self, key: Hashable) -> int:
        return self._held.get(key, 0)


def source_prefix(ip: str) -> str:
    """The source network `ip` belongs to (SOURCE_PREFIX_V4/V6); an unparsable source is its own."""
    try:
        addr = ipaddress.ip_address(unmapped(ip))
    except ValueError:
        return ip
    bits = SOURCE_PREFIX_V4 if addr.version == 4 else SOURCE_PREFIX_V6
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))

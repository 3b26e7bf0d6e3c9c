"""Token buckets: how much of something a party may have, refilled over time. Pure: the caller
passes `now` (monotonic seconds).

    b = TokenBucket(rate=0.5, burst=4)        # 4 at once, then one per 2 s
    if not b.take(now): refuse()
    per_peer = Buckets(rate=0.5, burst=4, max_keys=1024)   # one bucket per key, bounded memory
    shared = FairShare(per_key=(0.5, 8), total=(16, 64), cap=(32, 128), active_s=16, max_keys=4096)  # fair per key
    sybil = RisingCost(rate=16 / 3600, burst=16, half_life_s=3600, max_keys=10_000)   # 1, 2, 4, 8 … per key
    held = Concurrency(limit=8)                # at most 8 at once per key
    key = source_prefix("203.0.113.7")         # "203.0.113.0/24": one network, one key
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict, deque
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

    def take(self, key: Hashable, now: float, cost: float = 1.0, limits: tuple[float, float] | None = None) -> bool:
        """`limits`: (rate, burst) for this key from now on, instead of the default (FairShare)."""
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if limits is not None:
            b.available(now)  # refilled at the old rate up to now
            b.rate, b.burst = limits
            b.tokens = min(b.tokens, b.burst)
        return b.take(now, cost)

    def __len__(self) -> int:
        return len(self._buckets)


class FairShare:
    """A total budget shared fairly among the keys asking lately: each key's bucket has the rate
    and burst `per_key`, but never more than its share of `total` among the keys active in the last
    `active_s` (every ask counts, granted or not), and a burst of at least one. So a crowd of N
    identities gets the total between them however they pace their asks, while a peer that asks
    once still finds a token in its own bucket; `cap` (rate, burst) is a hard ceiling over all keys
    (CPU), set above `total` so that the crowd's shares never reach it."""

    def __init__(
        self,
        per_key: tuple[float, float],
        total: tuple[float, float],
        cap: tuple[float, float],
        active_s: float,
        max_keys: int,
    ) -> None:
        self.per_key, self.total, self.active_s = per_key, total, active_s
        self.keys = Buckets(*per_key, max_keys=max_keys)
        self.cap = TokenBucket(*cap)
        self._asks: deque[tuple[float, Hashable]] = deque()  # (when, who), oldest first
        self._active: Counter[Hashable] = Counter()  # asks per key within active_s

    def share(self, now: float) -> tuple[float, float]:
        """(rate, burst) of each key's bucket now."""
        while self._asks and self._asks[0][0] <= now - self.active_s:
            self._forget_oldest()
        n = max(1, len(self._active))
        return (min(self.per_key[0], self.total[0] / n), max(1.0, min(self.per_key[1], self.total[1] / n)))

    def _forget_oldest(self) -> None:
        _, old = self._asks.popleft()
        self._active[old] -= 1
        if not self._active[old]:
            del self._active[old]

    def take(self, key: Hashable, now: float) -> bool:
        self._asks.append((now, key))
        self._active[key] += 1
        if len(self._asks) > self.keys.max_keys * 8:  # bounded memory: forget the oldest asks
            self._forget_oldest()
        if self.cap.available(now) < 1.0:
            return False
        if not self.keys.take(key, now, limits=self.share(now)):
            return False
        return self.cap.take(now)


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

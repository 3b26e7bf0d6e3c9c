"""Which DCs the relay obeys: the active DCs of the NodeRegistry on chain, with a short TTL cache.

The relay keeps no event-fed registry cache (a DC does); it asks the contract's `getDC` for the
signer of each Relay Direction and remembers the answer for TRUST_TTL_S. Concurrent look-ups of
the same address share one chain call.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from ntm.errors import NtmError

# How long a chain answer about one DC is reused. A DC sends a Relay Direction per relayed
# path, possibly many per second; asking the chain each time would put the RPC on the hot path.
# 10 s bounds how long a DC removed on chain can still open relay paths here, which is short
# next to the governance action that removes it (and paths it opened die by their own caps).
TRUST_TTL_S = 10.0
# Entries remembered at most (one per distinct signer that passed the signature check); forged
# keys cost an attacker nothing, so the cache must not grow without bound.
TRUST_CACHE_SIZE = 10_000


class TrustError(NtmError):
    """The chain could not be asked (RPC down): neither trusted nor refused, try again later."""


class DcTrust:
    """`await trust.is_active(addr)`: is `addr` an active DC on chain (cached for `ttl` seconds)?

    `lookup(addr) -> bool` is the chain query (e.g. `lambda a: registry.dc(a)` wrapped to a bool);
    `clock` is injectable for tests.
    """

    def __init__(self, lookup: Callable[[bytes], Awaitable[bool]], ttl: float = TRUST_TTL_S,
                 clock: Callable[[], float] = time.monotonic, size: int = TRUST_CACHE_SIZE) -> None:
        self._lookup = lookup
        self.ttl = ttl
        self._clock = clock
        self._size = size
        self._cache: dict[bytes, tuple[bool, float]] = {}
        self._inflight: dict[bytes, asyncio.Future] = {}
        self.chain_calls = 0

    @classmethod
    def from_registry(cls, registry, **kw) -> "DcTrust":
        async def lookup(addr: bytes) -> bool:
            info = await registry.dc(addr)
            return info is not None and info.active
        return cls(lookup, **kw)

    async def is_active(self, addr: bytes) -> bool:
        now = self._clock()
        hit = self._cache.get(addr)
        if hit is not None and now - hit[1] < self.ttl:
            return hit[0]
        fut = self._inflight.get(addr)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[addr] = fut
        try:
            self.chain_calls += 1
            try:
                active = bool(await self._lookup(addr))
            except NtmError as exc:
                raise TrustError(f"cannot ask the registry whether {addr.hex()} is a DC: {exc}") from None
            if len(self._cache) >= self._size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[addr] = (active, self._clock())
            fut.set_result(active)
            return active
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else TrustError("lookup cancelled"))
                fut.exception()  # mark retrieved: waiters (if any) still get it
            raise
        finally:
            del self._inflight[addr]

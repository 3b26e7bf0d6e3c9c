"""JSON-RPC over HTTP with fallback URLs: a DC talks to its own validator first and to the
federation's other validators when that one fails, so no single chain node is a single point of
failure for it.

`FailoverHTTPProvider` is web3's `AsyncHTTPProvider` with a list of URLs. A request that fails
at the transport (connection refused or reset, timeout, an HTTP error status) is sent to the next URL at once;
a JSON-RPC error answer is a real answer and is returned as is. After a switch the first URL is
tried again every PRIMARY_RETRY_S, because it is the DC's own node (nearest, and the one whose
pool holds its transactions).

Connections are kept: web3's own session closes each one after its request (`force_close`), which
cost the DC a TCP connect and a TIME_WAIT socket per call of its 50 ms registry poll. A kept
connection the chain node closed while idle fails on reuse; that request is sent once more on a
fresh connection before the URL counts as down.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import aiohttp
from web3 import AsyncHTTPProvider

from ntm.clock import SYSTEM, Clock

log = logging.getLogger("ntm.chain.rpc")

# How often to go back to the first URL after failing over: soon enough that a restarted own
# validator is used again within a minute, rare enough that a dead one costs one refused connect.
PRIMARY_RETRY_S = 30.0
# A chain node that does not answer within this is treated as down for this request.
REQUEST_TIMEOUT_S = 10.0

TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


class FailoverHTTPProvider(AsyncHTTPProvider):
    def __init__(self, urls: Sequence[str], timeout: float = REQUEST_TIMEOUT_S, clock: Clock = SYSTEM) -> None:
        if not urls:
            raise ValueError("at least one JSON-RPC URL is needed")
        self.urls = list(urls)
        self._current = 0
        self._failed_at = 0.0
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        super().__init__(
            self.urls[0],
            exception_retry_configuration=None,
            request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout)},
        )

    @property
    def url(self) -> str:
        return self.urls[self._current]

    def _select(self, index: int) -> None:
        if index != self._current:
            log.warning("chain RPC: switching from %s to %s", self.urls[self._current], self.urls[index])
        self._current = index
        self.endpoint_uri = self.urls[index]

    async def _make_request(self, method, request_data: bytes) -> bytes:
        if self._current and self.clock.now() - self._failed_at > PRIMARY_RETRY_S:
            self._select(0)
        last: BaseException | None = None
        for step in range(len(self.urls)):
            index = (self._current + step) % len(self.urls)
            self._select(index)
            try:
                return await self._post(self.urls[index], request_data)
            except TRANSPORT_ERRORS as exc:
                last = exc
                if index == 0:
                    self._failed_at = self.clock.now()
        assert last is not None
        raise last

    async def _post(self, url: str, request_data: bytes) -> bytes:
        """One JSON-RPC POST on a kept connection; once more (on a fresh one) if the chain node had
        closed the kept one."""
        try:
            return await self._post_once(url, request_data)
        except aiohttp.ServerDisconnectedError:
            return await self._post_once(url, request_data)

    async def _post_once(self, url: str, request_data: bytes) -> bytes:
        if self._session is None or self._session.closed:
            # aiohttp's defaults: idle connections closed after 15 s, 100 at most
            self._session = aiohttp.ClientSession(raise_for_status=True)
        async with self._session.post(url, data=request_data, **self.get_request_kwargs()) as response:
            return await response.read()

    async def disconnect(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await super().disconnect()

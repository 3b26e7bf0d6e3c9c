"""What a Cache Server asks of the federation, through its own DC: whether a node may use it
(registered, not revoked), and where a recipient's home DC is, to tell it about an item.

The CS follows no chain itself: its DC already does (the registry cache), and answers whois
from it. Answers are cached briefly, so a flood of requests from one node costs one lookup.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import coincurve
from cachetools import TTLCache
from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

from cs.core import admit, notice_target
from cs.errors import CsError
from daemon import tlspin
from ntm import envelope, keys, messages
from ntm.clock import SYSTEM, Clock
from ntm.errors import NtmError

log = logging.getLogger("ntm.cs.dc")

# How long a "registered"/"revoked"/"unknown" verdict is reused: a revocation reaches the CS
# within this (it is immediate at the DC), and a node's burst of requests costs one lookup.
VERDICT_TTL_S = 2.0
VERDICTS_KEPT = 10_000
# The DC list (home DC address -> endpoint) changes only with admissions on chain.
DC_LIST_TTL_S = 60.0
# Notice delivery: attempts and the first delay (doubling); after that `ntm inbox` finds the item.
NOTIFY_ATTEMPTS = 5
NOTIFY_RETRY_S = 0.5
HTTP_TIMEOUT_S = 10.0


class DcLink:
    def __init__(self, dc_url: str, dc_key: coincurve.PrivateKey, clock: Clock = SYSTEM) -> None:
        self.dc_url = dc_url.rstrip("/")
        self.key = dc_key
        self.clock = clock
        self._http: aiohttp.ClientSession | None = None
        # expiring LRU caches: a verdict lives VERDICT_TTL_S, the oldest goes first when full
        self._verdicts: TTLCache[bytes, messages.NodeInfo | None] = TTLCache(
            VERDICTS_KEPT, VERDICT_TTL_S, timer=clock.now
        )
        self._dcs: TTLCache[str, dict[bytes, str]] = TTLCache(1, DC_LIST_TTL_S, timer=clock.now)
        self.counters = {"notices_sent": 0, "notices_failed": 0, "whois": 0}

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def _get(self, path: str, answer: type) -> Any:
        try:  # over TLS pinned to our DC's chain key, which is the key we sign with (§5)
            tls = await tlspin.ssl_for(self.http, self.dc_url, keys.node_id_of(self.key), HTTP_TIMEOUT_S)
            async with self.http.get(self.dc_url + path, ssl=tls) as r:
                text = await r.text()
                status = r.status
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, tlspin.ChannelError) as exc:
            raise CsError(
                "dc_unreachable", f"cannot reach this CS's DC at {self.dc_url}: {str(exc) or type(exc).__name__}"
            ) from None
        if status == 404:
            return None
        if status != 200:
            raise CsError("dc_unreachable", f"this CS's DC answered {status} for {path}")
        return messages.decode(answer, text)

    async def whois(self, node: bytes) -> messages.NodeInfo | None:
        if node in self._verdicts:
            return self._verdicts[node]
        self.counters["whois"] += 1
        info = await self._get(f"/v1/nodes/{keys.checksum(node)}", messages.NodeInfo)
        self._verdicts[node] = info
        return info

    async def check(self, node: bytes) -> messages.NodeInfo:
        """The node's record if it may use this CS; CsError otherwise (cs/core.py admit)."""
        return admit(node, await self.whois(node))

    async def _active_dcs(self) -> dict[bytes, str]:
        """Active DCs (address -> endpoint), as our DC lists them."""
        if "dcs" not in self._dcs:
            listing = await self._get("/v1/dcs", messages.DcList)
            self._dcs["dcs"] = {keys.parse_node_id(d.dc): d.endpoint for d in listing.dcs}
        return self._dcs["dcs"]

    async def _notify_once(self, notice: messages.CsNotice) -> None:
        node = keys.parse_node_id(notice.node)
        try:
            home, endpoint = notice_target(await self.check(node), await self._active_dcs())
            body = envelope.seal_body(self.key, messages.CS_NOTICE, notice, self.clock.wall_ms())
            tls = await tlspin.ssl_for(self.http, endpoint, home, HTTP_TIMEOUT_S)
            async with self.http.post(endpoint + "/v1/federation/cs-notice", json=body, ssl=tls) as r:
                if r.status != 200:
                    raise CsError("notice_refused", f"{r.status} {await r.text()}")
        except (NtmError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            log.info("notice of item %s for %s not delivered: %s", notice.item, notice.node, exc)
            self._verdicts.pop(node, None)  # the home may have changed
            raise

    async def notify(self, notice: messages.CsNotice) -> bool:
        """Tell the recipient's home DC, retried NOTIFY_ATTEMPTS times with a doubling delay from
        NOTIFY_RETRY_S (tenacity); False if it never took it."""
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(NOTIFY_ATTEMPTS),
                wait=wait_exponential(multiplier=NOTIFY_RETRY_S, max=60),
                reraise=True,
            ):
                with attempt:
                    await self._notify_once(notice)
        except (NtmError, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            self.counters["notices_failed"] += 1
            return False
        self.counters["notices_sent"] += 1
        return True

"""Items that Cache Servers hold for this node: fetched as soon as the home DC pushes a notice,
and once at start from every Cache Server of the federation (so an item left at a CS while this
node was homed elsewhere, or whose notice was lost, is found too).

Fetched items are written to `directory`, confirmed to their CS (which then deletes them), the
notice acknowledged to the DC, and handed to the application: `await Mailbox.next()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from pathlib import Path
from typing import Awaitable, Callable

import coincurve

from daemon.service import BackgroundTasks
from node.cs_client import CsClient, CsClientError, Received
from node.dc_client import REQUEST_TIMEOUT_S, DcClient, DcError
from ntm import keys, messages

log = logging.getLogger("ntm.node.mailbox")

# Recent notices and items kept in memory (for status and to skip a notice pushed twice); every
# item stays on disk in the inbox directory. Also how many fetched items wait for an application
# that never calls next() (the daemon): beyond it the oldest is dropped from the queue.
RECENT = 100


async def federation_cs_urls(dc_url: str, timeout: float = REQUEST_TIMEOUT_S) -> list[str]:
    """The Cache Server of every active DC (asked of each DC's /v1/info), ours first."""
    urls: list[str] = []
    async with DcClient(dc_url, timeout) as dc:
        own = (await dc.info()).cs
        entries = await dc.dcs()
    if own:
        urls.append(own)
    for entry in entries:
        try:
            async with DcClient(entry.endpoint, timeout) as other:
                cs = (await other.info()).cs
        except DcError:
            continue
        if cs and cs not in urls:
            urls.append(cs)
    return urls


class Mailbox:
    def __init__(self, key: coincurve.PrivateKey, directory: Path, ack_notice: Callable[[str], Awaitable[None]],
                 take: Callable[[Received], bool] = lambda item: False) -> None:
        """`take(item)`: a consumer inside the node (group traffic) that keeps an item from the queue."""
        self.key = key
        self.take = take
        self.directory = directory
        self.ack_notice = ack_notice
        self.tasks = BackgroundTasks()
        self._queue: asyncio.Queue[Received] = asyncio.Queue(maxsize=RECENT)
        self._busy: set[str] = set()
        self.notices: deque[messages.CsNotice] = deque(maxlen=RECENT)  # as pushed
        self.received: deque[Received] = deque(maxlen=RECENT)

    async def close(self) -> None:
        await self.tasks.cancel()

    def on_notice(self, notice: messages.CsNotice) -> None:
        self.notices.append(notice)
        self.tasks.spawn(self._fetch(notice.cs, notice.item))

    async def sweep(self, dc_url: str) -> int:
        """Fetch whatever waits at any Cache Server of the federation; returns how many."""
        count = 0
        try:
            urls = await federation_cs_urls(dc_url)
        except DcError as exc:
            log.warning("cannot list the federation's Cache Servers: %s", exc)
            return 0
        for url in urls:
            try:
                async with CsClient(self.key, url) as cs:
                    waiting = await cs.inbox()
            except CsClientError as exc:
                log.info("inbox at %s: %s", url, exc)
                continue
            for entry in waiting:
                if await self._fetch(url, entry["item"]):
                    count += 1
        return count

    async def _fetch(self, url: str, item: str) -> bool:
        if item in self._busy or any(r.item == item for r in self.received):
            return False
        self._busy.add(item)
        try:
            async with CsClient(self.key, url) as cs:
                got = await cs.fetch(item, self.directory)
        except CsClientError as exc:
            # not_found: fetched already (a notice pushed again) or expired; the rest is worth a warning
            log.log(logging.INFO if exc.code == "not_found" else logging.WARNING, "item %s at %s not fetched: %s",
                    item, url, exc)
            if exc.code in ("not_found", "bad_item"):
                await self.ack_notice(item)  # gone, or refused for good: the DC need not push it again
            return False
        finally:
            self._busy.discard(item)
        log.info("item %s from %s fetched: %s (%d bytes)", item, keys.checksum(got.sender), got.meta.app_id, got.size)
        self.received.append(got)
        if not self.take(got):  # group traffic goes to the node's groups, the rest to next()
            if self._queue.full():
                self._queue.get_nowait()
            self._queue.put_nowait(got)
        await self.ack_notice(item)
        return True

    async def next(self) -> Received:
        """The next item fetched for this node (the embedding API)."""
        return await self._queue.get()

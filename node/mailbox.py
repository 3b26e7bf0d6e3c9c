"""Items that Cache Servers hold for this node: fetched as soon as the home DC pushes a notice,
and once at start from every Cache Server of the federation (so an item left at a CS while this
node was homed elsewhere, or whose notice was lost, is found too).

Fetched items are written to `directory`, confirmed to their CS (which then deletes them), the
notice acknowledged to the DC, and handed to the application: `await Mailbox.next()`.

Only items from senders the node admits are fetched by themselves, and only while the directory
stays under its size cap (ntm/consent.py): a stranger's items wait at their Cache Server, on the
stranger's quota, listed by `ntm inbox` until the user fetches them (§12.1).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from pathlib import Path
from typing import Awaitable, Callable

import coincurve

from daemon.service import BackgroundTasks, LogLimiter
from node.cs_client import CsClient, CsClientError, Received
from node.dc_client import REQUEST_TIMEOUT_S, DcClient, DcError
from ntm import consent, keys, messages
from ntm.clock import SYSTEM, Clock

log = logging.getLogger("ntm.node.mailbox")

# Recent notices and items kept in memory (for status and to skip a notice pushed twice); every
# item stays on disk in the inbox directory. Also how many fetched items wait for an application
# that never calls next() (the daemon): beyond it the oldest is dropped from the queue.
RECENT = 100
# A notice naming a Cache Server we do not know makes us re-read the federation's list (a CS
# announced since) at most this often: injected notices cost the DCs a few GETs per minute.
CS_LIST_REFRESH_S = 30.0


async def federation_cs_urls(dc_url: str, timeout: float = REQUEST_TIMEOUT_S, pin: bytes | None = None) -> list[str]:
    """The Cache Server of every active DC (asked of each DC's /v1/info), ours first. `pin`: our
    DC's chain address (none: the one this process already checked at that URL)."""
    urls: list[str] = []
    async with DcClient(dc_url, timeout, pin=pin) as dc:
        own = (await dc.info()).cs
        entries = await dc.dcs()
    if own:
        urls.append(own)
    for entry in entries:
        try:
            async with DcClient(entry.endpoint, timeout, pin=keys.parse_node_id(entry.dc)) as other:
                cs = (await other.info()).cs
        except DcError:
            continue
        if cs and cs not in urls:
            urls.append(cs)
    return urls


def inbox_bytes(directory: Path) -> int:
    """What the fetched items take in `directory` (their metadata files are small and not counted)."""
    return (
        sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.suffix != ".json")
        if directory.is_dir()
        else 0
    )


def inbox_full_message(size: int) -> str:
    return (
        f"the inbox is full ({consent.MAX_INBOX_BYTES} bytes): an item of {size} bytes stays at its Cache Server; "
        "move or delete fetched items from $NTM_HOME/inbox first"
    )


class Mailbox:
    def __init__(
        self,
        key: coincurve.PrivateKey,
        directory: Path,
        ack_notice: Callable[[str], Awaitable[None]],
        take: Callable[[Received], bool] = lambda item: False,
        dc_url: Callable[[], str | None] = lambda: None,
        clock: Clock = SYSTEM,
        admits: Callable[[bytes], bool] = lambda sender: True,
    ) -> None:
        """`take(item)`: a consumer inside the node (group traffic) that keeps an item from the queue.
        `dc_url()`: our DC now, asked for the Cache Servers the DCs announce (the only ones a
        notice may send us to). `admits(sender)`: whose items are fetched without asking."""
        self.key = key
        self.admits = admits
        self.held: Counter[str] = Counter()  # items left waiting at their Cache Server, by reason
        self.dc_url = dc_url
        self.clock = clock
        self.known_cs: set[str] = set()  # Cache Server URLs the federation's DCs announce
        self._cs_read_at = float("-inf")
        self.refused = 0  # notices for another node or naming a CS no DC announces: ignored
        self._refusals = LogLimiter(log, "Cache Server notices", 10.0, clock)
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
        self.tasks.spawn(self._noticed(notice))

    async def _noticed(self, notice: messages.CsNotice) -> None:
        """Fetch what a notice names only if it is for us and at a Cache Server a DC announces
        (§12): a notice injected on the session cannot make us send a signed request elsewhere."""
        if keys.parse_node_id(notice.node) != keys.node_id_of(self.key):
            why = "for another node"
        elif not await self._announced(notice.cs.rstrip("/")):
            why = "naming a Cache Server no DC announces"
        else:
            if self._may_fetch(notice.item, notice.sender, notice.size):
                await self._fetch(notice.cs.rstrip("/"), notice.item)
            return
        self.refused += 1
        self._refusals.note(why)

    async def _announced(self, url: str) -> bool:
        now, dc_url = self.clock.now(), self.dc_url()
        if url in self.known_cs or dc_url is None or now - self._cs_read_at < CS_LIST_REFRESH_S:
            return url in self.known_cs
        self._cs_read_at = now
        try:
            self.known_cs.update(u.rstrip("/") for u in await federation_cs_urls(dc_url))
        except DcError as exc:
            log.info("cannot list the federation's Cache Servers: %s", exc)
        return url in self.known_cs

    async def sweep(self, dc_url: str) -> int:
        """Fetch whatever waits at any Cache Server of the federation; returns how many."""
        count = 0
        try:
            urls = await federation_cs_urls(dc_url)
        except DcError as exc:
            log.warning("cannot list the federation's Cache Servers: %s", exc)
            return 0
        self.known_cs.update(u.rstrip("/") for u in urls)
        self._cs_read_at = self.clock.now()
        for url in urls:
            try:
                async with CsClient(self.key, url, self.clock) as cs:
                    waiting = await cs.inbox()
            except CsClientError as exc:
                log.info("inbox at %s: %s", url, exc)
                continue
            for entry in waiting:
                if self._may_fetch(entry["item"], entry["sender"], entry["size"]) and await self._fetch(
                    url, entry["item"]
                ):
                    count += 1
        return count

    def _may_fetch(self, item: str, sender: str, size: int) -> bool:
        """By itself only from a sender we admit, and while the inbox has room (ntm/consent.py)."""
        try:
            admitted = self.admits(keys.parse_node_id(sender))
        except ValueError:
            admitted = False
        why = consent.fetch_verdict(admitted, size, inbox_bytes(self.directory))
        if why is not None:
            self.held[why] += 1
            log.info("item %s from %s (%d bytes) left at its Cache Server: %s", item, consent.escape(sender), size, why)
        return why is None

    async def fetch_on_request(self, dc_url: str, wanted: set[str]) -> list[dict]:
        """The user's `ntm inbox fetch`: the named items, whoever sent them, while the inbox has
        room; each answer is the item's description or its refusal ({item, error, message})."""
        done: list[dict] = []
        for url in await federation_cs_urls(dc_url):
            try:
                async with CsClient(self.key, url, self.clock) as cs:
                    waiting = [e for e in await cs.inbox() if e["item"] in wanted - {d["item"] for d in done}]
            except CsClientError as exc:
                log.info("inbox at %s: %s", url, exc)
                continue
            for entry in waiting:
                why = consent.inbox_room(entry["size"], inbox_bytes(self.directory))
                if why is not None:
                    done.append({"item": entry["item"], "error": why, "message": inbox_full_message(entry["size"])})
                elif await self._fetch(url, entry["item"]):
                    done.append(self.received[-1].describe())
                else:
                    done.append({"item": entry["item"], "error": "not_fetched", "message": "see the daemon's log"})
        return done + [
            {"item": i, "error": "not_found", "message": "no such item waits for this node"}
            for i in sorted(wanted - {d["item"] for d in done})
        ]

    async def _fetch(self, url: str, item: str) -> bool:
        if item in self._busy or any(r.item == item for r in self.received):
            return False
        self._busy.add(item)
        try:
            async with CsClient(self.key, url, self.clock) as cs:
                got = await cs.fetch(item, self.directory)
        except CsClientError as exc:
            # not_found: fetched already (a notice pushed again) or expired; the rest is worth a warning
            log.log(
                logging.INFO if exc.code == "not_found" else logging.WARNING,
                "item %s at %s not fetched: %s",
                item,
                url,
                exc,
            )
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

"""The Cache Server's HTTP API (docs/PROTOCOL.md §12): store sealed items for nodes that are
offline, hand them to their recipients, forget them once every recipient has confirmed.

Every request is a node-signed envelope (ntm/envelope.py; for uploads and downloads it rides in
the X-NTM-Auth header, the body being the item's ciphertext): fresh, never seen before, from a
registered, unrevoked node. Uploads and downloads stream; an upload is acknowledged once durable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import StreamReader, web

from cs.dclink import DcLink
from cs.errors import CsError
from cs.quota import Caps, Ledger, Stored
from cs.store import Store
from daemon import httpapp, service
from daemon.metrics import CONTENT_TYPE, Metrics
from ntm import envelope, keys, messages, seal
from ntm.errors import ParseError
from ntm.ratelimit import source_prefix

log = logging.getLogger("ntm.cs")

AUTH_HEADER = "X-NTM-Auth"
ITEM_HEADER = "X-NTM-Header"  # the sealed item's public header, on downloads
READ_CHUNK = 1 << 20  # bytes read from an upload at a time: memory stays flat for any item size
MAX_JSON_BODY = 16 * 1024  # list and ack requests are small envelopes
# Slowest upload taken: 16 KiB/s (128 kbit/s, a poor mobile uplink) on average; a 256 MiB item then
# has 4.5 h. A trickle below it would hold a socket and a quota reservation for nothing.
MIN_UPLOAD_BYTES_PER_S = 16 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-CS limits; every refusal names the one it hit."""

    max_item_bytes: int = 256 << 20  # one item: a large file, not a backup
    sender_bytes: int = 1 << 30  # stored for one sender, across its items
    sender_items: int = 1000
    recipient_bytes: int = 1 << 30  # waiting for one recipient
    ttl_ms: int = 7 * 24 * 3600 * 1000  # an undelivered item is deleted after a week
    total_bytes: int = 50 << 30  # stored in all: many identities together cannot fill the disk

    def caps(self) -> Caps:
        return Caps(self.sender_items, self.sender_bytes, self.recipient_bytes, self.total_bytes)


CS = web.AppKey("cs", object)
METRICS = web.AppKey("metrics", Metrics)


class CacheServer:
    def __init__(self, store: Store, link: DcLink, public_url: str, limits: Limits = Limits(),
                 idle_timeout_s: float = service.HTTP_IDLE_TIMEOUT_S) -> None:
        """`idle_timeout_s`: how long an upload may pause (and an HTTP connection idle)."""
        self.store, self.link, self.url, self.limits = store, link, public_url.rstrip("/"), limits
        self.idle_timeout_s = idle_timeout_s
        self.guard = envelope.ReplayGuard()
        self.tasks = service.BackgroundTasks()
        self.uploading: set[bytes] = set()  # item IDs streaming in now (a second upload of one is refused)
        self.ledger = Ledger(limits.caps())  # what the uploads in flight have reserved
        self.counters = {"uploads": 0, "downloads": 0, "confirmations": 0, "expired": 0, "refused": 0,
                         "bytes_in": 0, "bytes_out": 0}

    async def authorize(self, obj: object, kind: str) -> envelope.Envelope:
        """A node-signed envelope of `kind`: signature, freshness, no replay, then registered and not revoked."""
        env = envelope.open_envelope(obj, kind, int(time.time() * 1000), lambda _: True, self.guard)
        await self.link.check(env.sender)
        return env

    async def expire_loop(self, every_s: float = 60.0) -> None:
        while True:
            self.counters["expired"] += self.store.expire(int(time.time() * 1000))
            await asyncio.sleep(every_s)


def _header_envelope(request: web.Request) -> object:
    raw = request.headers.get(AUTH_HEADER)
    if raw is None:
        raise ParseError(f"missing {AUTH_HEADER} header (a node-signed envelope)")
    return messages.loads(raw)


async def _json_envelope(request: web.Request) -> object:
    if (request.content_length or 0) > MAX_JSON_BODY:
        raise CsError("too_large", f"request body over {MAX_JSON_BODY} bytes")
    return await service.read_json(request)


def _item_id(text: str) -> bytes:
    try:
        item = bytes.fromhex(text)
    except ValueError:
        item = b""
    if len(item) != seal.ITEM_ID_LEN:
        raise ParseError("an item ID is 32 hex digits")
    return item


def note_refusal(request: web.Request, exc: Exception, code: str) -> None:
    request.app[CS].counters["refused"] += 1
    log.info("refused %s %s: %s %s", request.method, request.path, code, exc)


ROUTES = web.RouteTableDef()


@ROUTES.put("/v1/items")
async def handle_put(request: web.Request) -> web.Response:
    cs: CacheServer = request.app[CS]
    env = await cs.authorize(_header_envelope(request), messages.CS_PUT)
    header = seal.Header.from_json(env.body.get("header"))
    size = env.body.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ParseError("size must be a positive integer")
    if header.sender != env.sender:
        raise CsError("not_sender", "an item is uploaded by the node that sealed it")
    lim = cs.limits
    if size > lim.max_item_bytes:
        raise CsError("too_large", f"item of {size} bytes; this CS takes at most {lim.max_item_bytes}")
    for r in header.wraps:
        try:
            await cs.link.check(r)
        except CsError as exc:
            raise CsError("bad_recipient", f"recipient: {exc}") from None
    if header.item in cs.uploading or cs.store.exists(header.item):
        raise CsError("exists", f"item {header.item.hex()} is already stored or being uploaded")
    # Reserved before a byte is stored, with nothing awaited between the usage read and the
    # reservation: concurrent uploads are checked against each other (issue 29 item 6).
    n, used = cs.store.sender_usage(env.sender)
    stored = Stored(n, used, {r: cs.store.recipient_usage(r) for r in header.wraps}, cs.store.count()[1])
    source = None if service.from_admin(request) else source_prefix(request.remote or "")
    reservation = cs.ledger.reserve(env.sender, tuple(header.wraps), source, size, stored, time.monotonic())
    cs.uploading.add(header.item)
    part = cs.store.partial(header.item)
    try:
        got = 0
        with open(part, "wb") as fh:
            async for chunk in body_chunks(request.content, size, cs.idle_timeout_s):
                got += len(chunk)
                if got > size:
                    raise CsError("incomplete", f"more than the announced {size} bytes")
                fh.write(chunk)
        if got != size:
            raise CsError("incomplete", f"got {got} of the announced {size} bytes")
        await asyncio.to_thread(cs.store.persist, header.item)
        now = int(time.time() * 1000)
        cs.store.index(header.item, env.sender, header.to_json(), list(header.wraps), size, now, now + lim.ttl_ms)
    except BaseException:
        part.unlink(missing_ok=True)
        cs.store.blob(header.item).unlink(missing_ok=True)  # persisted but not indexed: never acknowledged
        raise
    finally:
        cs.uploading.discard(header.item)
        cs.ledger.release(reservation)  # indexed (the store counts it) or failed (nothing kept)
    cs.counters["uploads"] += 1
    cs.counters["bytes_in"] += size
    log.info("stored item %s from %s: %d bytes for %d recipients", header.item.hex(), keys.checksum(env.sender),
             size, len(header.wraps))
    for r in header.wraps:
        notice = messages.CsNotice(node=keys.checksum(r), item=header.item.hex(), cs=cs.url,
                                   sender=keys.checksum(env.sender), size=size, created=now)
        cs.tasks.spawn(cs.link.notify(notice))
    return web.json_response({"item": header.item.hex(), "size": size, "expires": now + lim.ttl_ms}, status=201)


async def body_chunks(content: StreamReader, size: int, idle_s: float):
    """An upload's body, READ_CHUNK at a time. It must never pause for `idle_s` (the DC's and RS's
    HTTP idle limit) and must be all in by that plus `size` at MIN_UPLOAD_BYTES_PER_S, else it is
    refused `stalled`: a slow or trickling upload cannot hold a socket, a reservation and a file
    for long."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + idle_s + size / MIN_UPLOAD_BYTES_PER_S
    while True:
        try:
            chunk = await asyncio.wait_for(content.read(READ_CHUNK), min(idle_s, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise CsError("stalled", f"the upload stalled (a pause of {idle_s:g} s, or under "
                          f"{MIN_UPLOAD_BYTES_PER_S} bytes/s)") from None
        if not chunk:
            return
        yield chunk


def _listing(item) -> dict:
    return {"item": item.item.hex(), "sender": keys.checksum(item.sender), "size": item.size,
            "created": item.created_ms, "expires": item.expires_ms, "header": item.header}


@ROUTES.post("/v1/inbox")
async def handle_inbox(request: web.Request) -> web.Response:
    cs: CacheServer = request.app[CS]
    env = await cs.authorize(await _json_envelope(request), messages.CS_LIST)
    items = cs.store.inbox(env.sender, int(time.time() * 1000))
    return web.json_response({"cs": cs.url, "items": [_listing(i) for i in items]})


@ROUTES.get("/v1/items/{item}")
async def handle_get(request: web.Request) -> web.StreamResponse:
    cs: CacheServer = request.app[CS]
    item = _item_id(request.match_info["item"])
    env = await cs.authorize(_header_envelope(request), messages.CS_GET)
    stored = cs.store.get(item)
    # the same answer whether the item does not exist or is someone else's: no probing
    if env.body.get("item") != item.hex() or stored is None or not cs.store.waiting_for(env.sender, item):
        raise CsError("not_found", f"no item {item.hex()} for {keys.checksum(env.sender)}")
    cs.counters["downloads"] += 1
    cs.counters["bytes_out"] += stored.size
    return web.FileResponse(cs.store.blob(item), chunk_size=READ_CHUNK,
                            headers={ITEM_HEADER: json.dumps(stored.header, separators=(",", ":")),
                                     "Content-Type": "application/octet-stream"})


@ROUTES.post("/v1/items/{item}/ack")
async def handle_ack(request: web.Request) -> web.Response:
    cs: CacheServer = request.app[CS]
    item = _item_id(request.match_info["item"])
    env = await cs.authorize(await _json_envelope(request), messages.CS_ACK)
    if env.body.get("item") != item.hex() or not cs.store.waiting_for(env.sender, item):
        raise CsError("not_found", f"no item {item.hex()} for {keys.checksum(env.sender)}")
    deleted = cs.store.confirm(item, env.sender)
    cs.counters["confirmations"] += 1
    return web.json_response({"item": item.hex(), "deleted": deleted})


@ROUTES.get("/healthz")
async def handle_health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@ROUTES.get("/metrics")
@service.admin_only
async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


COUNTER_DOCS = {"uploads": "items stored", "downloads": "items served to a recipient",
                "confirmations": "recipients' confirmations", "expired": "items deleted unfetched after their TTL",
                "refused": "requests refused", "bytes_in": "item bytes stored", "bytes_out": "item bytes served",
                "notices_sent": "notices delivered to recipients' home DCs", "notices_failed": "notices given up on",
                "whois": "registration checks asked of our DC (not cached)"}


def cs_metrics(cs: CacheServer) -> Metrics:
    m = Metrics("ntm_cs")
    m.gauge("items", "items stored", lambda: cs.store.count()[0])
    m.gauge("bytes", "bytes stored", lambda: cs.store.count()[1])
    m.counters(lambda: {**cs.counters, **cs.link.counters}, COUNTER_DOCS)
    return m


def make_app(cs: CacheServer, admin_allow: tuple = ()) -> web.Application:
    app = httpapp.make_app(MAX_JSON_BODY, note_refusal)
    app[CS] = cs
    app[METRICS] = cs_metrics(cs)
    app[service.ADMIN_ALLOW] = tuple(admin_allow)
    app.add_routes(ROUTES)
    return app

"""The Cache Server's HTTP API (docs/PROTOCOL.md §12): store sealed items for nodes that are
offline, hand them to their recipients, forget them once every recipient has confirmed.

Every request is a node-signed envelope (ntm/envelope.py; for uploads and downloads it rides in
the X-NTM-Auth header, the body being the item's ciphertext): fresh, never seen before, from a
registered, unrevoked node. Uploads and downloads stream; an upload is acknowledged once durable.
This is the edge: what to accept and refuse is decided by the pure core (cs/core.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

from aiohttp import StreamReader, web

from cs.core import MIN_UPLOAD_BYTES_PER_S, Accepted, CacheCore, Limits, Upload, bad_recipient
from cs.dclink import DcLink
from cs.errors import CsError
from cs.quota import Stored
from cs.store import Store, StoredItem
from daemon import httpapp, service
from daemon.metrics import CONTENT_TYPE, Metrics
from ntm import envelope, keys, messages, seal
from ntm.clock import SYSTEM, Clock
from ntm.errors import ParseError
from ntm.ratelimit import source_prefix

log = logging.getLogger("ntm.cs")

AUTH_HEADER = "X-NTM-Auth"
ITEM_HEADER = "X-NTM-Header"  # the sealed item's public header, on downloads
READ_CHUNK = 1 << 20  # bytes read from an upload at a time: memory stays flat for any item size
MAX_JSON_BODY = 16 * 1024  # list and ack requests are small envelopes

CS = web.AppKey("cs", object)
METRICS = web.AppKey("metrics", Metrics)


class CacheServer:
    def __init__(
        self,
        store: Store,
        link: DcLink,
        public_url: str,
        limits: Limits = Limits(),
        idle_timeout_s: float = service.HTTP_IDLE_TIMEOUT_S,
        clock: Clock = SYSTEM,
    ) -> None:
        """`idle_timeout_s`: how long an upload may pause (and an HTTP connection idle)."""
        self.store, self.link, self.url = store, link, public_url.rstrip("/")
        self.idle_timeout_s = idle_timeout_s
        self.core = CacheCore(self.url, limits, clock, idle_timeout_s)
        self.tasks = service.BackgroundTasks()
        self.counters = {
            "uploads": 0,
            "downloads": 0,
            "confirmations": 0,
            "expired": 0,
            "refused": 0,
            "bytes_in": 0,
            "bytes_out": 0,
        }

    async def authorize(self, obj: object, kind: str) -> envelope.Envelope:
        """A node-signed envelope of `kind`: signature, freshness, no replay, then registered and not revoked."""
        env = self.core.open(obj, kind)
        await self.link.check(env.sender)
        return env

    async def expire_loop(self, every_s: float = 60.0) -> None:
        while True:
            self.counters["expired"] += self.store.expire(self.core.now_ms())
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
    offer = cs.core.offer(env)
    for r in offer.header.wraps:
        try:
            await cs.link.check(r)
        except CsError as exc:
            raise bad_recipient(exc) from None
    # Reserved before a byte is stored, with nothing awaited between the usage read and the
    # reservation: concurrent uploads are checked against each other (issue 29 item 6).
    item, wraps = offer.header.item, offer.header.wraps
    n, used = cs.store.sender_usage(offer.sender)
    stored = Stored(n, used, {r: cs.store.recipient_usage(r) for r in wraps}, cs.store.count()[1])
    source = None if service.from_admin(request) else source_prefix(request.remote or "")
    upload = cs.core.reserve(offer, stored, cs.store.exists(item), source)
    try:
        accepted = await receive(cs, request.content, upload)
    finally:
        cs.core.end(upload)  # indexed (the store counts it) or failed (nothing kept)
    cs.counters["uploads"] += 1
    cs.counters["bytes_in"] += offer.size
    log.info(
        "stored item %s from %s: %d bytes for %d recipients",
        item.hex(),
        keys.checksum(offer.sender),
        offer.size,
        len(wraps),
    )
    for notice in accepted.notices:
        cs.tasks.spawn(cs.link.notify(notice))
    return web.json_response({"item": item.hex(), "size": offer.size, "expires": accepted.expires_ms}, status=201)


async def receive(cs: CacheServer, content: StreamReader, upload: Upload) -> Accepted:
    """Stream an upload into its partial file, make it durable, index it; on any failure nothing
    of it is kept (it was never acknowledged)."""
    item = upload.offer.header.item
    part = cs.store.partial(item)
    try:
        got = 0
        with open(part, "wb") as fh:
            async for chunk in body_chunks(content, upload.deadline, cs.core.clock.now, cs.idle_timeout_s):
                got += len(chunk)
                cs.core.received(upload, got, done=False)
                fh.write(chunk)
        cs.core.received(upload, got, done=True)
        await asyncio.to_thread(cs.store.persist, item)
        accepted = cs.core.accept(upload)
        cs.store.index(
            item,
            upload.offer.sender,
            upload.offer.header.to_json(),
            list(upload.offer.header.wraps),
            upload.offer.size,
            accepted.created_ms,
            accepted.expires_ms,
        )
    except BaseException:
        part.unlink(missing_ok=True)
        cs.store.blob(item).unlink(missing_ok=True)  # persisted but not indexed: never acknowledged
        raise
    return accepted


async def body_chunks(content: StreamReader, deadline: float, now: Callable[[], float], idle_s: float):
    """An upload's body, READ_CHUNK at a time. It must never pause for `idle_s` (the DC's and RS's
    HTTP idle limit) and must be all in by `deadline` (on the clock `now`; CacheCore.reserve sets it
    from the size at MIN_UPLOAD_BYTES_PER_S), else it is refused `stalled`: a slow or trickling
    upload cannot hold a socket, a reservation and a file for long."""
    while True:
        try:
            chunk = await asyncio.wait_for(content.read(READ_CHUNK), min(idle_s, deadline - now()))
        except asyncio.TimeoutError:
            raise CsError(
                "stalled", f"the upload stalled (a pause of {idle_s:g} s, or under {MIN_UPLOAD_BYTES_PER_S} bytes/s)"
            ) from None
        if not chunk:
            return
        yield chunk


def _listing(item) -> dict:
    return {
        "item": item.item.hex(),
        "sender": keys.checksum(item.sender),
        "size": item.size,
        "created": item.created_ms,
        "expires": item.expires_ms,
        "header": item.header,
    }


@ROUTES.post("/v1/inbox")
async def handle_inbox(request: web.Request) -> web.Response:
    cs: CacheServer = request.app[CS]
    env = await cs.authorize(await _json_envelope(request), messages.CS_LIST)
    items = cs.store.inbox(env.sender, cs.core.now_ms())
    return web.json_response({"cs": cs.url, "items": [_listing(i) for i in items]})


def _addressed(cs: CacheServer, env: envelope.Envelope, item: bytes) -> StoredItem:
    """The stored item, if `env` may fetch or confirm it (CacheCore.may_fetch decides)."""
    stored = cs.store.get(item)
    cs.core.may_fetch(
        env.sender,
        item,
        envelope.body_of(env, messages.CsItemRef),
        None if stored is None else stored.expires_ms,
        cs.store.waiting_for(env.sender, item),
    )
    assert stored is not None  # refused above otherwise
    return stored


@ROUTES.get("/v1/items/{item}")
async def handle_get(request: web.Request) -> web.StreamResponse:
    cs: CacheServer = request.app[CS]
    item = _item_id(request.match_info["item"])
    env = await cs.authorize(_header_envelope(request), messages.CS_GET)
    stored = _addressed(cs, env, item)
    cs.counters["downloads"] += 1
    cs.counters["bytes_out"] += stored.size
    return web.FileResponse(
        cs.store.blob(item),
        chunk_size=READ_CHUNK,
        headers={
            ITEM_HEADER: json.dumps(stored.header, separators=(",", ":")),
            "Content-Type": "application/octet-stream",
        },
    )


@ROUTES.post("/v1/items/{item}/ack")
async def handle_ack(request: web.Request) -> web.Response:
    cs: CacheServer = request.app[CS]
    item = _item_id(request.match_info["item"])
    env = await cs.authorize(await _json_envelope(request), messages.CS_ACK)
    _addressed(cs, env, item)
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


COUNTER_DOCS = {
    "uploads": "items stored",
    "downloads": "items served to a recipient",
    "confirmations": "recipients' confirmations",
    "expired": "items deleted unfetched after their TTL",
    "refused": "requests refused",
    "bytes_in": "item bytes stored",
    "bytes_out": "item bytes served",
    "notices_sent": "notices delivered to recipients' home DCs",
    "notices_failed": "notices given up on",
    "whois": "registration checks asked of our DC (not cached)",
}


def cs_metrics(cs: CacheServer) -> Metrics:
    m = Metrics("ntm_cs")
    m.gauge("items", "items stored", lambda: cs.store.count()[0])
    m.gauge("bytes", "bytes stored", lambda: cs.store.count()[1])
    m.gauge("uploading_bytes", "bytes reserved by uploads in flight", lambda: cs.core.ledger.total_bytes)
    m.counters(lambda: {**cs.counters, **cs.link.counters}, COUNTER_DOCS)
    return m


def make_app(cs: CacheServer, admin_allow: tuple = ()) -> web.Application:
    app = httpapp.make_app(MAX_JSON_BODY, note_refusal)
    app[CS] = cs
    app[METRICS] = cs_metrics(cs)
    app[service.ADMIN_ALLOW] = tuple(admin_allow)
    app.add_routes(ROUTES)
    return app

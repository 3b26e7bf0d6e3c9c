"""HTTP, WebSocket and UDP adapters of the DC: JSON in, Coordinator calls, JSON out.

Every refusal is a JSON body {"error": code, "message": text} with a fitting status, and changes
nothing: the handlers parse and validate before they touch the store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from typing import Any, Awaitable, Callable

from aiohttp import WSMsgType, web

from daemon import channel, httpapp, service
from daemon.metrics import CONTENT_TYPE
from dc import dashboard, wiring
from dc import exit as dc_exit
from dc.chainstatus import ChainStatus
from dc.coordinator import Coordinator
from dc.errors import DirectionError, SourceLimited
from dc.federation import accept_hello
from ntm import keys, messages, routes, session_auth
from ntm.addr import format_endpoint, parse_endpoint
from ntm.errors import NtmError, ParseError, SignatureError
from ntm.registration import parse_request
from ntm.routes import RouteError

log = logging.getLogger("ntm.dc.http")

# Largest request body: a Registration Request is ~600 bytes; 16 KiB leaves room for growth
# while a flood of huge bodies cannot exhaust memory.
MAX_BODY = 16 * 1024
# A node must answer the session challenge quickly; slow clients hold a socket for nothing.
AUTH_TIMEOUT_S = 10.0
# The DC pings a node session after this long without a frame from it and drops the session
# (presence: the node is no longer reachable here) if the pong is not back within half of it:
# a node gone without a FIN is off the presence table within 15 s. A live node pings every 3 s
# itself (node/liveness.SESSION_HEARTBEAT_S), which resets this timer, so the DC sends no pings.
NODE_HEARTBEAT_S = 10.0

COORDINATOR = web.AppKey("coordinator", Coordinator)
EXIT_BOOKER = web.AppKey("exit_booker", dc_exit.ExitBooker)
CHAIN_STATUS = web.AppKey("chain_status", ChainStatus)
PROBE = web.AppKey("probe", dashboard.FederationProbe)
STARTED = web.AppKey("started", float)
ROUTES = web.RouteTableDef()


def reply(msg: messages.Message, status: int = 200) -> web.Response:
    return web.json_response(messages.encode(msg), status=status)


def error_for(exc: Exception) -> tuple[int, dict]:
    """The HTTP status and JSON error body for one of the project's exceptions (daemon/httpapp.py;
    the in-process federation of the fast tests answers with it too). Others propagate."""
    return httpapp.refusal(exc, MAX_BODY)


def count_refusal(request: web.Request, exc: Exception, code: str) -> None:
    """Count each refusal by what was asked (the route) and why."""
    route = request.match_info.route.resource
    request.app[COORDINATOR].metrics.refusals.labels(route.canonical if route else "other", code).inc()


@ROUTES.get("/v1/info")
async def handle_info(request: web.Request) -> web.Response:
    return reply(request.app[COORDINATOR].info())


@ROUTES.get("/v1/dcs")
async def handle_dcs(request: web.Request) -> web.Response:
    """Active DCs from the registry cache: where a node may re-register if its DC fails."""
    c = request.app[COORDINATOR]
    return reply(
        messages.DcList(
            [
                messages.DcEntry(keys.checksum(d.address), d.hostname, d.endpoint)
                for d in c.cache.dcs.values()
                if d.active
            ]
        )
    )


@ROUTES.post("/v1/register")
async def handle_register(request: web.Request) -> web.Response:
    req, wait = parse_request(await service.read_json(request))
    return reply(await request.app[COORDINATOR].register(req, wait, source=limited_source(request)))


def limited_source(request: web.Request) -> str | None:
    """The client's address for the per-source limits, None when it is exempt: the operator's own
    networks (--admin-allow, default loopback) are not limited per source (a provisioning host
    registers many nodes, its CS looks many up). The gas budget still applies to them."""
    return None if service.from_admin(request) else request.remote


@ROUTES.get("/v1/nodes/{node}")
async def handle_whois(request: web.Request) -> web.Response:
    try:
        node = keys.parse_node_id(request.match_info["node"])
    except ValueError as exc:
        raise ParseError(str(exc)) from None
    c = request.app[COORDINATOR]
    source = limited_source(request)
    if source is not None and not c.whois_rate.take(source, c.clock.now()):
        raise SourceLimited("rate_limited", "too many lookups from this address; retry in a second")
    info, _ = await c.lookup(node)
    # addresses go only to DCs and, later, in route directions
    info.local_addrs, info.observed, info.observed_alt = [], None, None
    return reply(info)


@ROUTES.post("/v1/federation/ntm-info")
async def handle_ntm_info(request: web.Request) -> web.Response:
    return web.json_response(request.app[COORDINATOR].answer_ntm_info(await service.read_json(request)))


@ROUTES.post("/v1/federation/route-direction")
async def handle_route_direction(request: web.Request) -> web.Response:
    return web.json_response(await request.app[COORDINATOR].signaling.accept_delivery(await service.read_json(request)))


@ROUTES.post("/v1/federation/direction-offer")
async def handle_direction_offer(request: web.Request) -> web.Response:
    return web.json_response(await request.app[COORDINATOR].signaling.accept_offer(await service.read_json(request)))


@ROUTES.post("/v1/federation/cs-notice")
async def handle_cs_notice(request: web.Request) -> web.Response:
    return web.json_response(await request.app[COORDINATOR].notices.accept(await service.read_json(request)))


async def _ntm_info(c: Coordinator, obj: Any) -> dict:
    return c.answer_ntm_info(obj)


# The federation calls a peer DC may make on its channel (§8.6), by the HTTP path each stands for.
FEDERATION_CALLS: dict[str, Callable[[Coordinator, Any], Awaitable[dict]]] = {
    "/v1/federation/ntm-info": _ntm_info,
    "/v1/federation/route-direction": lambda c, obj: c.signaling.accept_delivery(obj),
    "/v1/federation/direction-offer": lambda c, obj: c.signaling.accept_offer(obj),
    "/v1/federation/cs-notice": lambda c, obj: c.notices.accept(obj),
}


# Calls only a proven channel carries (§8.6 "Proven channels"): bare bodies from the DC that proved itself.
PROVEN_CALLS: dict[str, Callable[[Coordinator, bytes, Any], Awaitable[dict]]] = {
    messages.PROVEN_OFFER_PATH: lambda c, sender, obj: c.signaling.accept_proven_offer(sender, obj),
}


@ROUTES.get(channel.PATH)
async def handle_federation_channel(request: web.Request) -> web.WebSocketResponse:
    """A peer DC's kept WebSocket (§8.6, daemon/channel.py): its federation calls as frames. Anyone
    may open one: every call's envelope is verified as over HTTP, and bare calls are taken only
    once the caller proved on this TLS connection which active DC it is (its channel-hello)."""
    c = request.app[COORDINATOR]
    tls = request.transport is not None and request.transport.get_extra_info("ssl_object") is not None
    proven: list[bytes] = []  # the DC that proved itself on this channel, once it has

    async def answer(call: messages.ChannelCall) -> tuple[int, dict]:
        """As its HTTP request would be answered; a refusal counted under its path."""
        handler = FEDERATION_CALLS.get(call.path)
        known = handler is not None or call.path in PROVEN_CALLS or call.path == messages.CHANNEL_HELLO_PATH
        try:
            if call.path == messages.CHANNEL_HELLO_PATH:
                if not tls:  # plain HTTP: anyone on the path could add calls after the proof
                    raise ParseError("a channel is proven only over TLS")
                proven[:] = [accept_hello(call.body, c.address, c.cache.is_active_dc, c.guard, c.clock.wall_ms())]
                return 200, {}
            if call.path in PROVEN_CALLS:
                if not proven:
                    raise SignatureError(f"{call.path} only on a channel whose DC proved itself")
                return 200, await PROVEN_CALLS[call.path](c, proven[0], call.body)
            if handler is None:
                raise ParseError(f"no federation call {call.path!r}")
            return 200, await handler(c, call.body)
        except NtmError as exc:
            status, body = error_for(exc)
            c.metrics.refusals.labels(call.path if known else "other", body["error"]).inc()
            return status, body

    return await channel.serve(request, answer, MAX_BODY)


@ROUTES.post("/v1/groups")
async def handle_groups(request: web.Request) -> web.Response:
    """The Group Management Server (dc/groups.py): one node-signed envelope per request."""
    return web.json_response(request.app[COORDINATOR].groups.handle(await service.read_json(request)))


@ROUTES.post("/v1/exit-bookings")
async def handle_exit_booking(request: web.Request) -> web.Response:
    """A node asks for an exit at a relay (dc/exit.py, §10.13): the relay's grant, or its refusal."""
    return reply(await request.app[EXIT_BOOKER].book(await service.read_json(request)))


@ROUTES.get("/healthz")
async def handle_health(request: web.Request) -> web.Response:
    """200 only when this DC can do all its work: admitted, chain reachable and caught up, gas to
    pay for registrations. Otherwise 503 and why (it still serves what it can: degraded mode)."""
    c = request.app[COORDINATOR]
    report = {
        "dc_active": c.cache.is_active_dc(c.address),
        **request.app[CHAIN_STATUS].report(),
        "outbox_pending": c.store.count_outbox("pending"),
    }
    ok = report["dc_active"] and report["chain"] == "ok" and report["gas"] != "low"
    return web.json_response({"ok": ok, **report}, status=200 if ok else 503)


@ROUTES.get("/dashboard")
@service.admin_only
async def handle_dashboard(request: web.Request) -> web.Response:
    """The operator's page (dc/dashboard.py): static HTML that polls /v1/dashboard."""
    return web.Response(
        text=dashboard.PAGE.read_text(),
        content_type="text/html",
        headers={
            "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'",
            "Cache-Control": "no-store",
        },
    )


@ROUTES.get("/v1/dashboard")
@service.admin_only
async def handle_dashboard_data(request: web.Request) -> web.Response:
    return web.json_response(
        dashboard.snapshot(
            request.app[COORDINATOR], request.app[CHAIN_STATUS], request.app[PROBE], request.app[STARTED]
        )
    )


@ROUTES.get("/metrics")
@service.admin_only
async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[COORDINATOR].metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@ROUTES.get("/v1/session")
async def handle_session(request: web.Request) -> web.WebSocketResponse:
    """Node session: challenge → signed answer → welcome with keepalive token → pushes."""
    c = request.app[COORDINATOR]
    source = limited_source(request)
    if source is not None and not c.unauthenticated.acquire(source):
        raise SourceLimited("rate_limited", "too many unauthenticated sessions from this address")
    held = [source is not None]

    def authenticated() -> None:
        """The session answered its challenge (or ended): its unauthenticated slot is free."""
        if held[0]:
            held[0] = False
            c.unauthenticated.release(source)

    try:
        return await session(request, c, authenticated)
    finally:
        authenticated()


async def session(request: web.Request, c: Coordinator, authenticated: Callable[[], None]) -> web.WebSocketResponse:
    """The session once admitted; `authenticated()` is called once the node proved its key."""
    ws = web.WebSocketResponse(heartbeat=NODE_HEARTBEAT_S, max_msg_size=MAX_BODY)
    await ws.prepare(request)

    async def send(msg: messages.Message) -> None:
        await ws.send_str(messages.dumps(msg))

    challenge = os.urandom(session_auth.CHALLENGE_LEN)
    await send(messages.Challenge(keys.checksum(c.address), challenge.hex()))
    try:
        msg = await asyncio.wait_for(ws.receive(), AUTH_TIMEOUT_S)
        if msg.type != WSMsgType.TEXT:
            raise ParseError("expected the auth message")
        auth = messages.decode(messages.Auth, msg.data)
        node = keys.parse_node_id(auth.node)
        session_auth.verify(node, c.address, challenge, bytes.fromhex(auth.signature))
        local = tuple(format_endpoint(*parse_endpoint(a)) for a in auth.local_addrs)
        if auth.routes is not None and routes.verify_offer(auth.routes).node != node:
            raise RouteError("the route offer is another node's")
        authenticated()
    except (asyncio.TimeoutError, NtmError) as exc:
        await send(messages.SessionError("auth_failed", f"session refused: {exc}"))
        await ws.close()
        return ws
    _, revoked = c.latest(node)
    if revoked or c.store.node(node) is None:
        await send(
            messages.SessionError("not_home", "node is revoked" if revoked else "node is not registered at this DC")
        )
        await ws.close()
        return ws
    tasks = service.BackgroundTasks()

    async def end_session(reason: str) -> None:
        """The DC ends the session (superseded, revoked): say why, then close."""
        try:
            await send(messages.SessionError("session_ended", reason))
        except (ConnectionError, RuntimeError):
            pass
        await ws.close()

    session = c.presence.open(
        node,
        functools.partial(ws.send_json, dumps=messages.dumps),
        local,
        end=lambda reason: tasks.spawn(end_session(reason)),
        routes=auth.routes,
    )
    log.info("session open: %s", keys.checksum(node))
    await send(messages.Welcome(session.token.hex(), list(c.keepalive_ports)))
    tasks.spawn(c.notices.on_session(node))
    try:
        async for msg in ws:
            if not c.presence.is_live(session):
                break  # ended by the DC: nothing more is served on it
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                req = messages.decode(messages.NodeToDc, msg.data)
            except ParseError as exc:
                await send(messages.SessionError("malformed", str(exc)))
                continue
            if isinstance(req, messages.StatusQuery):
                await send(messages.StatusReply(session.observed, session.observed_alt, session.counters["keepalives"]))
            elif isinstance(req, messages.DirectionRequest):
                tasks.spawn(direction_request(c, send, node, req))
            elif isinstance(req, messages.DirectionAck):
                c.signaling.on_ack(node, req)
            elif isinstance(req, messages.CsNoticeAck):
                c.notices.ack(node, req.item)
            else:
                await send(messages.SessionError("unexpected", f"unexpected {type(req).__name__} in a session"))
    finally:
        c.presence.close(session)
        await tasks.cancel()
        log.info("session closed: %s", keys.checksum(node))
    return ws


async def direction_request(c: Coordinator, send, node: bytes, req: messages.DirectionRequest) -> None:
    """Serve one Direction Request from a session; the answer carries the request's id."""
    try:
        resume = bytes.fromhex(req.resume) if req.resume is not None else None
        route, direction = await c.signaling.request(
            node,
            keys.parse_node_id(req.peer),
            force_relay=req.route == "relay",
            direct_only=req.route == "direct",
            resume=resume,
            inline=req.inline,
        )
        result = messages.DirectionResult(req.id, route=route, direction=direction)
    except NtmError as exc:  # the WebSocket form of a refusal: the code its HTTP answer would carry
        code = exc.refusal()[1]
        c.metrics.refusals.labels("direction", code).inc()
        abandoned = exc.abandoned if isinstance(exc, DirectionError) else None
        result = messages.DirectionResult(
            req.id,
            error=messages.ErrorBody(code, str(exc)),
            abandoned=abandoned.hex() if abandoned is not None else None,
        )
    try:
        await send(result)
    except ConnectionError:
        pass  # the session ended meanwhile


def make_app(
    coordinator: Coordinator,
    chain_status: ChainStatus,
    admin_allow: tuple = (),
    probe: dashboard.FederationProbe | None = None,
) -> web.Application:
    """`admin_allow`: networks that may read /metrics and the dashboard (empty: loopback only).
    `probe`: the running federation probe the dashboard reports (none: DCs show as not probed)."""
    app = httpapp.make_app(MAX_BODY, count_refusal)
    app[COORDINATOR] = coordinator
    app[CHAIN_STATUS] = chain_status
    app[PROBE] = probe or wiring.probe(coordinator)
    app[STARTED] = coordinator.clock.now()
    app[EXIT_BOOKER] = dc_exit.ExitBooker(coordinator)
    channel.enable(app)
    coordinator.metrics.watch(coordinator, chain_status)
    app[service.ADMIN_ALLOW] = tuple(admin_allow)
    app.add_routes(ROUTES)
    return app

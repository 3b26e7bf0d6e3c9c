"""HTTP, WebSocket and UDP adapters of the DC: JSON in, Coordinator calls, JSON out.

Every refusal is a JSON body {"error": code, "message": text} with a fitting status, and changes
nothing: the handlers parse and validate before they touch the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from aiohttp import WSMsgType, web

from dc.coordinator import Coordinator, NodeLookupError
from dc.federation import FederationError
from dc.signaling import PATH_ID_LEN, DirectionError
from ntm import keys, service, session_auth
from ntm.errors import NtmError, ParseError, SignatureError
from ntm.registration import MAX_LOCAL_ADDRS, RegistrationError, format_endpoint, parse_endpoint, parse_request

log = logging.getLogger("ntm.dc.http")

# Largest request body: a Registration Request is ~600 bytes; 16 KiB leaves room for growth
# while a flood of huge bodies cannot exhaust memory.
MAX_BODY = 16 * 1024
# A node must answer the session challenge quickly; slow clients hold a socket for nothing.
AUTH_TIMEOUT_S = 10.0

COORDINATOR = web.AppKey("coordinator", Coordinator)


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


async def read_json(request: web.Request):
    try:
        return json.loads(await request.read())
    except web.HTTPRequestEntityTooLarge:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise ParseError(f"body is not JSON: {exc}") from None


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Map the project's exceptions to JSON errors in one place."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return error(413, "too_large", f"request body exceeds {MAX_BODY} bytes")
    except ParseError as exc:
        return error(400, "malformed", str(exc))
    except RegistrationError as exc:
        status = {"revoked": 403, "stale": 409, "dc_inactive": 503}.get(exc.code, 400)
        return error(status, exc.code, str(exc))
    except SignatureError as exc:
        return error(403, "forbidden", str(exc))
    except NodeLookupError as exc:
        return error(404 if exc.code == "unknown_node" else 502, exc.code, str(exc))
    except FederationError as exc:
        return error(502, "federation", str(exc))
    except DirectionError as exc:
        return error(404, exc.code, str(exc))
    except NtmError as exc:  # e.g. the chain is unreachable for a cache miss
        return error(503, "unavailable", str(exc))


async def handle_info(request: web.Request) -> web.Response:
    return web.json_response(request.app[COORDINATOR].info())


async def handle_dcs(request: web.Request) -> web.Response:
    """Active DCs from the registry cache: where a node may re-register if its DC fails."""
    c = request.app[COORDINATOR]
    return web.json_response({"dcs": [{"dc": keys.checksum(d.address), "hostname": d.hostname, "endpoint": d.endpoint}
                                      for d in c.cache.dcs.values() if d.active]})


async def handle_register(request: web.Request) -> web.Response:
    body = await read_json(request)
    req = parse_request(body)
    wait = isinstance(body, dict) and body.get("wait") == "confirmed"
    return web.json_response(await request.app[COORDINATOR].register(req, wait))


async def handle_whois(request: web.Request) -> web.Response:
    try:
        node = keys.parse_node_id(request.match_info["node"])
    except ValueError as exc:
        raise ParseError(str(exc)) from None
    info = await request.app[COORDINATOR].whois(node)
    info.pop("local_addrs", None)  # addresses go only to DCs and, later, in route directions
    info.pop("observed", None)
    info.pop("observed_alt", None)
    return web.json_response(info)


async def handle_ntm_info(request: web.Request) -> web.Response:
    return web.json_response(request.app[COORDINATOR].answer_ntm_info(await read_json(request)))


async def handle_route_direction(request: web.Request) -> web.Response:
    return web.json_response(await request.app[COORDINATOR].signaling.accept_delivery(await read_json(request)))


async def handle_health(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    ok = c.cache.is_active_dc(c.address)
    return web.json_response({"ok": ok, "block": c.cache.block}, status=200 if ok else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    gauges = {
        "ntm_dc_nodes_stored": c.store.node_count(),
        "ntm_dc_outbox_pending": c.store.count_outbox("pending"),
        "ntm_dc_outbox_confirmed": c.store.count_outbox("confirmed"),
        "ntm_dc_outbox_rejected": c.store.count_outbox("rejected"),
        "ntm_dc_sessions": len(c.presence.sessions),
        "ntm_dc_registry_block": c.cache.block,
        "ntm_dc_registry_nodes": len(c.cache.nodes),
        "ntm_dc_chain_tx_sent_total": c.submitter.sent_tx,
        "ntm_dc_chain_failures_total": c.submitter.failures,
        "ntm_dc_keepalives_dropped_total": c.presence.dropped_keepalives,
        **{f"ntm_dc_{k}_total": v for k, v in {**c.counters, **c.signaling.counters}.items()},
    }
    return web.Response(text=service.prometheus_text(gauges), content_type="text/plain")


async def handle_session(request: web.Request) -> web.WebSocketResponse:
    """Node session: challenge → signed answer → welcome with keepalive token → pushes."""
    c = request.app[COORDINATOR]
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_BODY)
    await ws.prepare(request)
    challenge = os.urandom(session_auth.CHALLENGE_LEN)
    await ws.send_json({"type": "challenge", "dc": keys.checksum(c.address), "challenge": challenge.hex()})
    try:
        msg = await asyncio.wait_for(ws.receive(), AUTH_TIMEOUT_S)
        auth = json.loads(msg.data) if msg.type == WSMsgType.TEXT else None
        node = keys.parse_node_id(auth["node"])
        session_auth.verify(node, c.address, challenge, bytes.fromhex(auth["signature"]))
        local = auth.get("local_addrs", [])
        if not isinstance(local, list) or len(local) > MAX_LOCAL_ADDRS:
            raise ValueError(f"local_addrs must be a list of at most {MAX_LOCAL_ADDRS} endpoints")
        local = tuple(format_endpoint(*parse_endpoint(a)) for a in local)
    except (asyncio.TimeoutError, ValueError, TypeError, KeyError, NtmError) as exc:
        await ws.send_json({"type": "error", "error": "auth_failed", "message": f"session refused: {exc}"})
        await ws.close()
        return ws
    _, revoked = c.latest(node)
    stored = c.store.node(node)
    if revoked or stored is None:
        reason = "node is revoked" if revoked else "node is not registered at this DC"
        await ws.send_json({"type": "error", "error": "not_home", "message": reason})
        await ws.close()
        return ws
    session = c.presence.open(node, ws.send_json, local)
    log.info("session open: %s", keys.checksum(node))
    await ws.send_json({"type": "welcome", "token": session.token.hex(), "keepalive_ports": list(c.keepalive_ports)})
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                req = json.loads(msg.data)
                kind = req["type"]
            except (ValueError, TypeError, KeyError):
                await ws.send_json({"type": "error", "error": "malformed", "message": "expected JSON with a type"})
                continue
            if kind == "status":
                await ws.send_json({"type": "status", "observed": session.observed,
                                    "observed_alt": session.observed_alt, **session.counters})
            elif kind == "direction-request":
                asyncio.create_task(direction_request(c, ws, node, req))
            else:
                await ws.send_json({"type": "error", "error": "unknown_type", "message": f"unknown type {kind!r}"})
    finally:
        c.presence.close(session)
        log.info("session closed: %s", keys.checksum(node))
    return ws


async def direction_request(c: Coordinator, ws: web.WebSocketResponse, node: bytes, req: dict) -> None:
    """Serve one Direction Request from a session; the answer carries the request's id."""
    reply = {"type": "direction-result", "id": req.get("id")}
    try:
        peer = keys.parse_node_id(str(req.get("peer")))
        resume = bytes.fromhex(req["resume"]) if req.get("resume") is not None else None
        if resume is not None and len(resume) != PATH_ID_LEN:
            raise ValueError("resume must be a path ID (8 bytes hex)")
        reply.update(ok=True, **await c.signaling.request(node, peer, force_relay=req.get("route") == "relay",
                                                         resume=resume))
    except DirectionError as exc:
        reply.update(ok=False, error=exc.code, message=str(exc))
    except (ValueError, TypeError, NtmError) as exc:
        reply.update(ok=False, error="bad_request", message=str(exc))
    if not ws.closed:
        await ws.send_json(reply)


def make_app(coordinator: Coordinator) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[errors_middleware])
    app[COORDINATOR] = coordinator
    app.router.add_get("/v1/info", handle_info)
    app.router.add_get("/v1/dcs", handle_dcs)
    app.router.add_post("/v1/register", handle_register)
    app.router.add_get("/v1/nodes/{node}", handle_whois)
    app.router.add_post("/v1/federation/ntm-info", handle_ntm_info)
    app.router.add_post("/v1/federation/route-direction", handle_route_direction)
    app.router.add_get("/v1/session", handle_session)
    app.router.add_get("/healthz", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    return app

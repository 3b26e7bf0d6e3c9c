"""The server half of a kept call channel (docs/PROTOCOL.md §8.6): HTTP requests of one peer as
frames on one WebSocket, answered by id and concurrently. A DC serves its federation calls on it
(dc/server.py), a relay its Relay Directions (rs/server.py); the client half is dc/federation.py's
Channel. Per call the CPU of both ends is ~1/4 of an HTTP request's (issue 30).
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from daemon import httpapp, service
from ntm import messages
from ntm.errors import ParseError

log = logging.getLogger("ntm.channel")

PATH = "/v1/federation/channel"
# Calls one channel may have in flight: a DC under load has about as many as its nodes have
# directions in flight (64 in bench/scale.py); beyond this a call is refused at once (503 busy),
# so one connection cannot hold unbounded tasks.
CALLS_MAX = 1024
CHANNELS = web.AppKey("channels", set)  # the open channels, closed when the server stops

# A call's answer: what its HTTP request would get (status, JSON body); the project's refusals are
# the answerer's to map, anything else raised is a bug (500, one log line).
Answer = Callable[[messages.ChannelCall], Awaitable[tuple[int, dict]]]


def enable(app: web.Application) -> None:
    """Let `app` serve channels: they are closed when it stops (an open WebSocket would otherwise
    hold the server's cleanup for a minute); their callers' calls fail at once and they reconnect."""
    app[CHANNELS] = set()
    app.on_shutdown.append(close_all)


async def close_all(app: web.Application) -> None:
    for ws in list(app[CHANNELS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"stopping")


async def serve(request: web.Request, answer: Answer, max_body: int) -> web.WebSocketResponse:
    """The channel on `request`: each frame one call, answered by `answer` with its id. A frame that
    is not a call (JSON as messages.loads refuses it, or not a ChannelCall) ends the channel."""
    ws = web.WebSocketResponse(max_msg_size=max_body)
    await ws.prepare(request)
    calls = service.BackgroundTasks()
    request.app[CHANNELS].add(ws)
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                call = messages.decode(messages.ChannelCall, messages.loads(msg.data))
            except ParseError as exc:
                await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=str(exc)[:120].encode())
                break
            if len(calls) >= CALLS_MAX:
                busy = messages.encode(messages.ErrorBody("busy", "too many calls in flight on this channel; retry"))
                await reply(ws, call.id, 503, busy)
            else:
                calls.spawn(_call(ws, call, answer))
    finally:
        request.app[CHANNELS].discard(ws)
    return ws  # calls still running finish; their replies go nowhere (as over HTTP)


async def _call(ws: web.WebSocketResponse, call: messages.ChannelCall, answer: Answer) -> None:
    try:
        status, body = await answer(call)
    except Exception as exc:  # noqa: BLE001 - a bug: answered without its details, logged in one line
        log.error("call %s failed: %s: %s", call.path[:64], type(exc).__name__, exc)
        status, body = 500, messages.encode(httpapp.INTERNAL)
    await reply(ws, call.id, status, body)


async def reply(ws: web.WebSocketResponse, call_id: int, status: int, body: dict) -> None:
    try:
        await ws.send_str(messages.dumps(messages.ChannelReply(call_id, status, body)))
    except ConnectionError:
        pass  # the caller went away meanwhile

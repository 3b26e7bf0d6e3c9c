"""The one HTTP app skeleton of the DC, the CS and the RS: a body limit, the refusal middleware
and the runner with the idle timeout.

A refusal is a JSON body {"error": code, "message": text} with the status the error's class
gives (ntm/errors.py), whichever server raised it. An exception that is not the project's is a
bug: the client gets 500 and a body that says nothing of it, the log one line naming it and where.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import Callable

from aiohttp import web

from ntm import messages
from ntm.errors import NtmError

log = logging.getLogger("ntm.http")

# Called with the request, the error and its code on every refusal (metrics, logs).
OnRefusal = Callable[[web.Request, Exception, str], None]
ON_REFUSAL = web.AppKey("on_refusal", object)
MAX_BODY = web.AppKey("max_body", int)
INTERNAL = messages.ErrorBody("internal", "internal error")  # all a client learns of a bug


def refusal(exc: Exception, max_body: int) -> tuple[int, dict]:
    """The HTTP status and JSON error body for one of the project's exceptions or a body over
    `max_body` bytes; any other exception is re-raised (one mapping: the middleware's, and the
    in-process federation's of the fast tests)."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        status, code, message = 413, "too_large", f"request body exceeds {max_body} bytes"
    elif isinstance(exc, NtmError):
        (status, code), message = exc.refusal(), str(exc)
    else:
        raise exc
    return status, messages.encode(messages.ErrorBody(code, message))


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame: enough to find a bug from its one log line."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


@web.middleware
async def refusals(request: web.Request, handler):
    """The project's errors become their JSON refusal; a bug becomes a bare 500 and one log line.
    aiohttp's own answers (404, 405, ...; 504 for a timeout), a client gone mid-request and a bug
    after the answer has begun (a WebSocket's: no other answer can be sent) pass through."""
    try:
        return await handler(request)
    except (web.HTTPRequestEntityTooLarge, NtmError) as exc:
        status, body = refusal(exc, request.app[MAX_BODY])
        on_refusal = request.app.get(ON_REFUSAL)
        if on_refusal is not None:
            on_refusal(request, exc, body["error"])
        return web.json_response(body, status=status)
    except (web.HTTPException, ConnectionError, asyncio.TimeoutError):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug: answered without its details, logged in one line
        if request.writer.output_size > 0:
            raise
        log.error("%s %s failed: %s: %s at %s", request.method, request.path, type(exc).__name__, exc, _where(exc))
        return web.json_response(messages.encode(INTERNAL), status=500)


def make_app(max_body: int, on_refusal: OnRefusal | None = None) -> web.Application:
    """An app taking request bodies up to `max_body` bytes, its refusals answered by `refusals`
    (and reported to `on_refusal`). JSON bodies are read with service.read_json (nesting and
    integer range refused with 400)."""
    app = web.Application(client_max_size=max_body, middlewares=[refusals])
    app[MAX_BODY] = max_body
    if on_refusal is not None:
        app[ON_REFUSAL] = on_refusal
    return app


def runner(app: web.Application, idle_timeout_s: float) -> web.AppRunner:
    """The app's runner: no access log (one line per request is an outsider's lever on our disk),
    connections idle or sending headers slower than `idle_timeout_s` closed (slowloris)."""
    return web.AppRunner(app, access_log=None, keepalive_timeout=idle_timeout_s)

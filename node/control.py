"""The daemon's control socket: JSON over HTTP on a Unix socket in $NTM_HOME (mode 0600), so
`ntm status/ping/send/recv/down` use the running node instead of starting a second one (which
would knock the daemon off its DC session). docs/PROTOCOL.md §10.6 lists the requests.

Only the owner of $NTM_HOME can connect: the socket file's mode is the access control.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

SOCKET_FILE = "ntm.sock"
#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
#: Control requests are small JSON objects; the largest is `ntm send` of one full datagram, its
#: text JSON-escaped (up to 6 bytes per byte).
MAX_REQUEST = 512 * 1024
#: A command waits this long for the daemon to accept its connection before calling it gone.
CONNECT_TIMEOUT_S = 2.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
#: A long-lived exchange (`ntm nc`, `ntm serve`): a WebSocket at GET /v1/<name>?<query>.
SocketHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A WebSocket message carries at most this much stream data (plus a little framing).
MAX_SOCKET_MESSAGE = 256 * 1024


class ControlError(Exception):
    """The daemon refused a request (`code`, message), or is not running (code "no_daemon")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def socket_path(base: Path) -> Path:
    path = base / SOCKET_FILE
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ControlError(
            "bad_home", f"{path} is too long for a Unix socket ({MAX_SOCKET_PATH} bytes at most); use a shorter --home"
        )
    return path


class ControlServer:
    """Serves `handlers` (name → async function of the JSON body) at POST /v1/<name>."""

    def __init__(self, runner: web.AppRunner, path: Path) -> None:
        self.runner = runner
        self.path = path

    @classmethod
    async def start(
        cls, base: Path, handlers: dict[str, Handler], sockets: dict[str, SocketHandler] | None = None
    ) -> ControlServer:
        app = web.Application(client_max_size=MAX_REQUEST)
        for name, handler in handlers.items():
            app.router.add_post(f"/v1/{name}", _wrap(handler))
        for name, socket_handler in (sockets or {}).items():
            app.router.add_get(f"/v1/{name}", socket_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        path = socket_path(base)
        path.unlink(missing_ok=True)  # left by a daemon that died; the lock says nobody else runs
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born 0600: no window where others can connect
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        await web.SockSite(runner, sock).start()
        return cls(runner, path)

    async def close(self) -> None:
        await self.runner.cleanup()
        self.path.unlink(missing_ok=True)


def _wrap(handler: Handler):
    async def serve(request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
        except ValueError as exc:
            return web.json_response({"error": "bad_request", "message": f"bad request: {exc}"}, status=400)
        try:
            return web.json_response(await handler(body))
        except ControlError as exc:
            return web.json_response({"error": exc.code, "message": str(exc)}, status=400)

    return serve


def daemon_socket(base: Path) -> Path:
    """The control socket of `base`'s daemon; ControlError("no_daemon") if none was started."""
    path = socket_path(base)
    if not path.exists():
        raise ControlError("no_daemon", f"no daemon running for {base} (start it with `ntm up`)")
    return path


def _no_daemon(path: Path) -> ControlError:
    return ControlError("no_daemon", f"no daemon answers at {path} (start it with `ntm up`)")


async def call(base: Path, name: str, body: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """POST one request to the daemon of `base`; ControlError("no_daemon") if none runs."""
    path = daemon_socket(base)
    conn = aiohttp.UnixConnector(path=str(path))
    tmo = aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(connector=conn, timeout=tmo) as http:
            async with http.post(f"http://ntm/v1/{name}", json=body or {}) as resp:
                try:
                    data = await resp.json()
                except (aiohttp.ContentTypeError, ValueError):  # aiohttp's own refusal (e.g. 413), not JSON
                    raise ControlError(
                        "refused", f"the daemon refused the request: HTTP {resp.status} {resp.reason}"
                    ) from None
    except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError):
        raise _no_daemon(path) from None
    except asyncio.TimeoutError:
        raise ControlError("timeout", f"the daemon at {path} did not answer within {timeout:.0f} s") from None
    if "error" in data:
        raise ControlError(data["error"], data.get("message", data["error"]))
    return data


@contextlib.asynccontextmanager
async def open_socket(base: Path, name: str, query: dict[str, str]) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A WebSocket to the daemon's GET /v1/<name> (ControlError("no_daemon") if none runs).
    Its first message is the daemon's JSON answer: {"ok": true, ...} or {"error", "message"}."""
    path = daemon_socket(base)
    conn = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S)
    ) as http:
        try:
            ws = await http.ws_connect(
                f"http://ntm/v1/{name}", params=query, max_msg_size=MAX_SOCKET_MESSAGE, heartbeat=None
            )
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError):
            raise _no_daemon(path) from None
        async with ws:
            yield ws

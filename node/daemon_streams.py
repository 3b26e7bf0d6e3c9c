"""Streams through the daemon (docs/PROTOCOL.md §10.9, §10.8): `ntm nc` and `ntm serve`.

The daemon holds one StreamHub (QUIC inside its tunnels, as an embedded node does) and offers it
on its control socket as two WebSockets, so commands without root or a TUN move bytes to peers:

    GET /v1/nc?peer=P&port=N      the daemon opens a stream to port N on peer P and splices it to
                                  the socket: binary messages are stream bytes, the text "eof" a
                                  half-close; the first message is {"ok", "peer"} or {"error", ...}
    GET /v1/serve?port=N&to=H:P   while this socket is open, streams that admitted peers open to
                                  port N are connected to the local TCP service H:P (loopback
                                  only); each is announced as {"stream": peer} (or with "error")

Only the owner of $NTM_HOME reaches the control socket; peers reach only the ports served and
only if the daemon admits them (its allow list, §10.6).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
from typing import Callable

from aiohttp import WSMsgType, web

from daemon import startup
from node.control import MAX_SOCKET_MESSAGE, ControlError
from node.dataplane import DataPlane
from node.streams import NO_SERVICE, NOT_ALLOWED, Handler, PeerGone, StreamHub, StreamRefused
from ntm import keys
from ntm.errors import NtmError

log = logging.getLogger("ntm.daemon")

#: The text message that half-closes a stream spliced to a socket (binary messages are data).
EOF_MESSAGE = "eof"
#: Stream bytes per WebSocket message: one read of the QUIC stream.
SPLICE_CHUNK_BYTES = 64 * 1024
#: How long `ntm serve` waits for the local service to accept a connection.
LOCAL_CONNECT_TIMEOUT_S = 5.0


def parse_port(text: str | None) -> int:
    """A port in a request (the servers' flag check, daemon/startup.py), or ControlError."""
    try:
        return startup.port(text or "")
    except argparse.ArgumentTypeError as exc:
        raise ControlError("bad_request", str(exc)) from None


def parse_local_target(text: str | None) -> tuple[str, int]:
    """`host:port` (IPv6 as [addr]:port) of a service on this machine; only loopback, so a served
    port never forwards peers into the LAN."""
    host, sep, port = (text or "").rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host:
        raise ControlError("bad_request", f"--to {text!r} is not HOST:PORT")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ControlError("bad_request", f"--to {text!r}: {host!r} is not an IP address or localhost") from None
        if not loopback:
            raise ControlError("bad_request", f"--to {text!r}: only a service on this machine (loopback) can be served")
    return host, parse_port(port)


async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side."""
    while data := await reader.read(SPLICE_CHUNK_BYTES):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter], b: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    """Both directions until both ended (or one failed: then both are closed)."""
    try:
        await asyncio.gather(copy(a[0], b[1]), copy(b[0], a[1]))
    finally:
        a[1].close()
        b[1].close()


class DaemonStreams:
    """The daemon's streams: one QUIC hub over the data plane's tunnels, the served ports."""

    def __init__(self, plane: DataPlane, admit: Callable[[bytes], bool], resolve: Callable[[str], bytes]) -> None:
        self.plane = plane
        self.admit = admit
        self.resolve = resolve  # a peer as the user names it (alias or 0x…) → node ID, or ControlError
        endpoint = plane.node.endpoint
        self.hub = StreamHub(
            plane.node.id, plane.send_quic, self._serve, endpoint.hold, endpoint.flush, plane.node.session.clock
        )
        self.served: dict[int, Handler] = {}
        plane.on_quic = self.hub.on_payload

    def sockets(self) -> dict[str, Callable[[web.Request], object]]:
        return {"nc": self.h_nc, "serve": self.h_serve}

    async def close(self) -> None:
        await self.hub.close()

    def _serve(self, peer: bytes, port: int) -> Handler | int:
        if not self.admit(peer):
            return NOT_ALLOWED
        return self.served.get(port, NO_SERVICE)

    async def h_nc(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_SOCKET_MESSAGE)
        await ws.prepare(request)
        try:
            peer = self.resolve(request.query.get("peer", ""))
            port = parse_port(request.query.get("port"))
            await self.plane.tunnel_to(peer)
            reader, writer = await self.hub.open(peer, port)
        except (ControlError, NtmError, StreamRefused) as exc:
            await _refuse(ws, getattr(exc, "code", "refused"), str(exc))
            return ws
        except (PeerGone, TimeoutError) as exc:
            await _refuse(ws, "peer_gone", str(exc) or "the peer did not answer")
            return ws
        await ws.send_json({"ok": True, "peer": keys.checksum(peer), "port": port})
        await self._splice_socket(ws, reader, writer)
        return ws

    async def _splice_socket(
        self, ws: web.WebSocketResponse, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Stream → socket until the peer's EOF (then "eof"); socket → stream until "eof". A
        socket closed before its "eof" (the command was interrupted) resets the stream."""

        async def to_socket() -> None:
            try:
                while data := await reader.read(SPLICE_CHUNK_BYTES):
                    await ws.send_bytes(data)
                await ws.send_str(EOF_MESSAGE)
            except ConnectionError as exc:
                if not ws.closed:
                    await ws.send_json({"error": "peer_gone", "message": str(exc)})

        sending = asyncio.ensure_future(to_socket())
        half_closed = False
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY and not half_closed:
                    writer.write(msg.data)
                    await writer.drain()
                elif msg.type == WSMsgType.TEXT and msg.data == EOF_MESSAGE and not half_closed:
                    writer.write_eof()
                    half_closed = True
            if not half_closed:
                writer.transport.abort()
            await sending
        except ConnectionError as exc:
            if not ws.closed:
                await ws.send_json({"error": "peer_gone", "message": str(exc)})
        finally:
            sending.cancel()
            await ws.close()

    async def h_serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_SOCKET_MESSAGE)
        await ws.prepare(request)
        try:
            port = parse_port(request.query.get("port"))
            host, local_port = parse_local_target(request.query.get("to"))
            if port in self.served:
                raise ControlError("port_in_use", f"port {port} is already served (by another `ntm serve`)")
        except ControlError as exc:
            await _refuse(ws, exc.code, str(exc))
            return ws

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = keys.checksum(writer.get_extra_info("peer"))
            try:
                local = await asyncio.wait_for(asyncio.open_connection(host, local_port), LOCAL_CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                writer.transport.abort()
                await _tell(ws, {"stream": peer, "error": f"{host}:{local_port} did not accept: {exc}"})
                return
            await _tell(ws, {"stream": peer})
            await splice((reader, writer), local)

        self.served[port] = handler
        log.info("serving port %d → %s:%d", port, host, local_port)
        try:
            await ws.send_json({"ok": True, "port": port, "to": f"{host}:{local_port}"})
            async for _ in ws:  # held until the command goes (Ctrl-C, or it was killed)
                pass
        finally:
            if self.served.get(port) is handler:
                del self.served[port]
            log.info("no longer serving port %d", port)
        return ws


async def _tell(ws: web.WebSocketResponse, message: dict) -> None:
    if not ws.closed:
        try:
            await ws.send_json(message)
        except ConnectionError:
            pass


async def _refuse(ws: web.WebSocketResponse, code: str, message: str) -> None:
    await _tell(ws, {"error": code, "message": message})
    await ws.close()

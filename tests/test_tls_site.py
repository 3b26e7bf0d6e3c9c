"""The TLS server site of DCs and relays (daemon/tlspin.TlsSockSite), in process: what an idle
connection costs it, and what a client that does not speak TLS gets.

Adversary: a crowd of clients that connect and hold their connections open (what a DC's node
sessions are, one TLS connection each). asyncio's TLS protocol allocates a 256 KiB read buffer
per connection up front: 264 KB of a DC's ~280 KB per session at 1,000 sessions (bench/scale.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import tracemalloc

from aiohttp import web

from daemon import service, tlspin
from ntm.clock import SYSTEM

CONNECTIONS = 20
HANDSHAKE_TIMEOUT_S = 10.0  # generous: the machine runs other tests


@contextlib.asynccontextmanager
async def tls_site(tmp_path):
    """A TlsSockSite serving GET / with a fresh self-signed certificate; its port."""
    cert, key = tlspin.ensure_certificate(tmp_path / "cert.pem", tmp_path / "key.pem", "dc", SYSTEM)
    ctx, _ = tlspin.server_context(cert, key)
    app = web.Application()
    app.router.add_get("/", lambda request: web.Response(text="ok"))
    runner = web.AppRunner(app)
    await runner.setup()
    sock = service.tcp_listener("127.0.0.1", 0)
    site = tlspin.TlsSockSite(runner, sock, ssl_context=ctx, handshake_timeout=HANDSHAKE_TIMEOUT_S)
    await site.start()
    try:
        yield sock.getsockname()[1]
    finally:
        await runner.cleanup()


def held_connections(port: int, n: int) -> list[ssl.SSLSocket]:
    """`n` TLS connections, each answered once and then held open (blocking sockets, run in a
    thread: their buffers are OpenSSL's, outside what tracemalloc counts)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conns = []
    for _ in range(n):
        conn = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_S))
        conn.sendall(b"GET / HTTP/1.1\r\nHost: dc\r\n\r\n")
        assert conn.recv(4096).startswith(b"HTTP/1.1 200"), "the site answers over TLS"
        conns.append(conn)
    return conns


async def test_an_idle_tls_connection_costs_the_server_a_small_read_buffer_not_256_kib(tmp_path):
    """A crowd holding TLS connections open: the server's Python memory grows by about one
    TLS_READ_BUFFER_BYTES per connection (asyncio's own protocol: 256 KiB each)."""
    async with tls_site(tmp_path) as port:
        await asyncio.to_thread(lambda: [c.close() for c in held_connections(port, 1)])  # warm up
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            conns = await asyncio.to_thread(held_connections, port, CONNECTIONS)
            each = (tracemalloc.get_traced_memory()[0] - before) / CONNECTIONS
        finally:
            tracemalloc.stop()
        for c in conns:
            c.close()
    assert each < 2 * tlspin.TLS_READ_BUFFER_BYTES < 256 * 1024, f"{each:.0f} bytes per idle TLS connection"


async def test_a_client_that_does_not_speak_tls_is_closed_without_a_traceback(tmp_path, caplog):
    """Plain HTTP (or any junk) to the TLS port: the connection is closed, the app never sees a
    request, nothing above INFO is logged, and the site goes on serving TLS clients."""
    caplog.set_level(logging.DEBUG)
    async with tls_site(tmp_path) as port:

        def plain() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_S) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: dc\r\n\r\n")
                return s.recv(4096)

        assert await asyncio.to_thread(plain) == b""
        await asyncio.to_thread(lambda: [c.close() for c in held_connections(port, 1)])
    assert not [r for r in caplog.records if r.levelno > logging.INFO], caplog.text

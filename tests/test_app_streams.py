"""The application module (node/api.py) end to end: two embedded nodes, no root, real DCs, relay
and chain on loopback (tests/dcnet.py); reliable streams over QUIC inside the tunnel."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest

from node.api import AppNode, PeerGone, StreamRefused
from ntm import keys
from tests.dcnet import register

#: Generous bound for a loaded 2-core machine: the peer going away must not hang a reader.
GONE_WITHIN_S = 5.0


@pytest.fixture
async def apps(net):
    """App A at DC1 and app B at DC2 (AppNode in this process), B admitting any peer."""
    ka, kb = keys.generate(), keys.generate()
    await register(net.urls[0], ka)
    await register(net.urls[1], kb)
    a = await AppNode.start(ka, net.urls[0], host="127.0.0.1", port=0)
    b = await AppNode.start(kb, net.urls[1], host="127.0.0.1", port=0)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def test_streams_echo_and_refused_port(apps):
    """A stream to a served port echoes; one to a port nobody serves is refused at once, with the reason."""
    a, b = apps
    await b.start_server(echo, 7)
    reader, writer = await a.open_connection(b.id, 7)
    writer.write(b"hello over quic")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b"hello over quic"
    t0 = time.monotonic()
    with pytest.raises(StreamRefused) as exc:
        await a.open_connection(b.id, 8)
    assert exc.value.code == "no_service" and time.monotonic() - t0 < 2.0

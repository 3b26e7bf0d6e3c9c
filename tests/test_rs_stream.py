"""The relay's stream listener (PROTOCOL §8.4), in process: real WebSocket connections and a real
UDP socket on loopback around one relay table.

Adversaries: a node behind a UDP-blocking firewall meets a UDP node on one path; a stranger opens
streams and binds nothing, speaks text, sends oversized frames, or opens more streams than the
relay holds; a stream without the side key tries to take a bound side.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import ssl

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from daemon import tlspin
from daemon.service import tcp_listener
from node.relay_stream import RelayStream
from ntm import packet
from ntm.clock import SYSTEM
from rs import stream as rs_stream
from rs.relay import RelayTable
from daemon.service import udp_socket
from rs.server import Relay, RelayUdp, make_stream_app
from rs.trust import DcTrust
from tests.fakes import FakeClock

PATH, TOKEN = os.urandom(8), os.urandom(32)
KEYS = (packet.relay_side_key(TOKEN, 0), packet.relay_side_key(TOKEN, 1))
_counters = itertools.count(1)


def data_packet(payload: bytes) -> bytes:
    """An opaque forwarded packet (DATA type, our path): the relay reads only the prefix."""
    return bytes([packet.TYPE_DATA]) + PATH + payload


def bind(side: int, cookie: bytes = packet.NO_COOKIE, key: bytes | None = None) -> bytes:
    return packet.RelayBind.make(PATH, side, next(_counters), cookie, key or KEYS[side]).encode()


@pytest.fixture
async def relay():
    clock = FakeClock()
    r = Relay(RelayTable(), DcTrust(), ["127.0.0.1:1"], 0, clock=clock)
    r.table.add_path(PATH, TOKEN, clock.now() + 3600, 1 << 30, clock.now())
    udp = RelayUdp(r, udp_socket("127.0.0.1", 0))
    server = TestServer(make_stream_app(r), host="127.0.0.1")
    await server.start_server()
    r.test_url = str(server.make_url(rs_stream.STREAM_PATH))  # type: ignore[attr-defined]
    r.test_udp = udp.sock.getsockname()  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as http:
        r.http = http  # type: ignore[attr-defined]
        yield r
    await r.streams.close()
    await server.close()
    udp.close()


async def stream_bind(ws, side: int) -> None:
    """Bind a side over the stream: first bind learns the cookie, the second binds."""
    await ws.send_bytes(bind(side))
    ack = packet.RelayBindAck.parse((await ws.receive(timeout=2)).data)
    await ws.send_bytes(bind(side, ack.cookie))
    ack = packet.RelayBindAck.parse((await ws.receive(timeout=2)).data)
    assert ack.bound


async def test_stream_side_and_udp_side_meet_on_one_path(relay):
    """The node without UDP (stream) and its peer on UDP bind the two sides of one path and
    exchange packets both ways; the relay forwards them unchanged."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(2)
    try:
        ws = await relay.http.ws_connect(relay.test_url)
        await stream_bind(ws, 0)
        udp.sendto(bind(1), relay.test_udp)
        ack = packet.RelayBindAck.parse(await asyncio.to_thread(udp.recv, 100))
        udp.sendto(bind(1, ack.cookie), relay.test_udp)
        assert packet.RelayBindAck.parse(await asyncio.to_thread(udp.recv, 100)).bound

        big = data_packet(os.urandom(60_000))
        await ws.send_bytes(big)
        assert await asyncio.to_thread(udp.recv, 65536) == big
        udp.sendto(data_packet(b"back over udp"), relay.test_udp)
        assert (await ws.receive(timeout=2)).data == data_packet(b"back over udp")
        assert relay.table.paths[PATH].packets == [1, 1]
        await ws.close()
    finally:
        udp.close()


async def test_two_streams_and_a_stranger_without_the_key(relay):
    """Two stream nodes share a path; a third stream that lacks the side key cannot take a side
    (its bind is refused before any cookie) and its packets are dropped as an unknown sender."""
    a = await relay.http.ws_connect(relay.test_url)
    b = await relay.http.ws_connect(relay.test_url)
    await stream_bind(a, 0)
    await stream_bind(b, 1)
    stranger = await relay.http.ws_connect(relay.test_url)
    await stranger.send_bytes(bind(1, key=os.urandom(32)))
    await stranger.send_bytes(data_packet(b"let me in"))
    await a.send_bytes(data_packet(b"hi b"))
    assert (await b.receive(timeout=2)).data == data_packet(b"hi b")
    with pytest.raises(asyncio.TimeoutError):
        await stranger.receive(timeout=0.3)
    assert relay.table.dropped["bad_token"] == 1 and relay.table.dropped["unknown_sender"] == 1
    for ws in (a, b, stranger):
        await ws.close()


async def test_idle_stranger_streams_are_closed(relay):
    """A stream that carries no path is closed after STREAM_FIRST_TRAFFIC_S; one that carries a
    path stays until STREAM_IDLE_S without traffic."""
    idle = await relay.http.ws_connect(relay.test_url)
    busy = await relay.http.ws_connect(relay.test_url)
    other = await relay.http.ws_connect(relay.test_url)
    await stream_bind(busy, 0)
    await stream_bind(other, 1)
    await busy.send_bytes(data_packet(b"x"))
    await other.receive(timeout=2)
    relay.clock.advance(rs_stream.STREAM_FIRST_TRAFFIC_S + 1)
    assert relay.streams.expire() == 1
    assert (await idle.receive(timeout=2)).type is aiohttp.WSMsgType.CLOSE
    relay.clock.advance(rs_stream.STREAM_IDLE_S)
    assert relay.streams.expire() == 2
    for ws in (busy, other):
        assert (await ws.receive(timeout=2)).type is aiohttp.WSMsgType.CLOSE


async def test_text_and_oversized_frames_end_the_stream(relay):
    text = await relay.http.ws_connect(relay.test_url)
    await text.send_str("hello")
    assert (await text.receive(timeout=2)).type is aiohttp.WSMsgType.CLOSE
    big = await relay.http.ws_connect(relay.test_url)
    await big.send_bytes(b"\x03" * (packet.MAX_DATAGRAM + 1))
    assert (await big.receive(timeout=2)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert relay.streams.counters["refused_frame"] == 2 and relay.streams.counters["rx_packets"] == 0


async def test_more_streams_than_the_relay_holds_are_refused(relay, monkeypatch):
    """A stranger opening many streams from one address gets 429 past the per-source cap; past the
    relay's total, everyone gets 503; closing one frees its place."""
    monkeypatch.setattr(rs_stream, "MAX_STREAMS_PER_SOURCE", 2)
    held = [await relay.http.ws_connect(relay.test_url) for _ in range(2)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await relay.http.ws_connect(relay.test_url)
    assert exc.value.status == 429 and relay.streams.counters["refused_source"] == 1
    relay.streams.max_streams = 2
    monkeypatch.setattr(rs_stream, "MAX_STREAMS_PER_SOURCE", 10)
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await relay.http.ws_connect(relay.test_url)
    assert exc.value.status == 503 and relay.streams.counters["refused_full"] == 1
    await held.pop().close()
    await asyncio.sleep(0.1)
    held.append(await relay.http.ws_connect(relay.test_url))
    assert dict(relay.streams.per_source) == {"127.0.0.1": 2}
    for ws in held:
        await ws.close()


def self_signed(tmp_path):
    """A throwaway certificate for the relay's TLS listener: (its file, its key's file)."""
    return tlspin.ensure_certificate(tmp_path / "cert.pem", tmp_path / "key.pem", "relay.test", SYSTEM)


async def test_node_stream_over_tls_binds_and_carries_packets(relay, tmp_path):
    """The node's RelayStream (node/relay_stream.py) to a wss:// listener with a certificate it
    does not check (TLS is camouflage here, §8.4): it binds a side and a packet comes back
    through it from the UDP side."""
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    runner = web.AppRunner(make_stream_app(relay))
    await runner.setup()
    sock = tcp_listener("127.0.0.1", 0)
    await web.SockSite(runner, sock, ssl_context=tls).start()
    got: asyncio.Queue = asyncio.Queue()
    relay_addr = ("127.0.0.1", 9)  # the relay's UDP endpoint as the node's sessions know it
    st = RelayStream(
        relay_addr,
        [f"wss://127.0.0.1:{sock.getsockname()[1]}/v1/stream"],
        lambda data, addr: got.put_nowait((data, addr)),
    )
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        st.send(bind(0))
        data, addr = await asyncio.wait_for(got.get(), 5)
        assert addr == relay_addr
        st.send(bind(0, packet.RelayBindAck.parse(data).cookie))
        assert packet.RelayBindAck.parse((await asyncio.wait_for(got.get(), 5))[0]).bound
        udp.sendto(bind(1), relay.test_udp)
        udp.sendto(bind(1, packet.RelayBindAck.parse(await asyncio.to_thread(udp.recv, 100)).cookie), relay.test_udp)
        await asyncio.to_thread(udp.recv, 100)
        udp.sendto(data_packet(b"through tls"), relay.test_udp)
        assert (await asyncio.wait_for(got.get(), 5)) == (data_packet(b"through tls"), relay_addr)
        assert st.connected and st.stats["connects"] == 1
    finally:
        udp.close()
        await st.close()
        await runner.cleanup()

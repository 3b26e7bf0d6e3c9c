"""The application module (node/api.py) end to end: two embedded nodes, no root, real DCs, relay
and chain on loopback (labkit/dcnet.py); reliable streams over QUIC inside the tunnel."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest

from node.api import AppNode, Event, PeerGone, StreamRefused
from ntm import keys
from labkit.dcnet import register, until

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


async def test_not_allowed_peer_is_refused(net):
    """Hostile peer: a node B's allow list does not name opens a stream to a port B serves; it is
    refused at once with the reason and its handler never runs."""
    ka, kb = keys.generate(), keys.generate()
    await register(net.urls[0], ka)
    await register(net.urls[1], kb)
    a = await AppNode.start(ka, net.urls[0], host="127.0.0.1", port=0)
    b = await AppNode.start(kb, net.urls[1], host="127.0.0.1", port=0, allow=[keys.node_id_of(keys.generate())])
    ran = []
    try:
        await b.start_server(lambda r, w: ran.append(1), 7)
        t0 = time.monotonic()
        with pytest.raises(StreamRefused) as exc:
            await a.open_connection(b.id, 7)
        assert exc.value.code in ("not_allowed", "refused", "not_admitted") and time.monotonic() - t0 < 3.0
        print(f"\nrefused by the allow list: {exc.value} in {time.monotonic() - t0:.3f} s")
        await b.send(a.id, b"hi")  # B opens a tunnel to A (outbound is always allowed) ...
        assert await asyncio.wait_for(a.recv(), 10) == (b.id, b"hi")
        with pytest.raises(StreamRefused) as exc:  # ... A's stream over it is still refused by B's list
            await a.open_connection(b.id, 7)
        assert exc.value.code == "not_allowed"
        assert not ran
    finally:
        await a.close()
        await b.close()


async def digest_of(reader: asyncio.StreamReader) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while data := await reader.read(1 << 16):
        h.update(data)
        n += len(data)
    return h.hexdigest(), n


async def write_all(writer: asyncio.StreamWriter, blob: bytes, chunk: int = 1 << 16) -> None:
    view = memoryview(blob)
    for i in range(0, len(blob), chunk):
        writer.write(view[i : i + chunk])
        await writer.drain()
    writer.write_eof()


BIG_BYTES = 50 * 1000 * 1000


async def test_50_mb_both_ways_over_one_stream(apps):
    """50 MB each way at once over one stream, compared by SHA-256: nothing lost, reordered or
    duplicated, and drain() holds the writers back instead of buffering everything."""
    a, b = apps
    to_b, to_a = os.urandom(BIG_BYTES), os.urandom(BIG_BYTES)
    got_at_b: asyncio.Future = asyncio.get_running_loop().create_future()

    async def sink_and_send(reader, writer):
        sent = asyncio.ensure_future(write_all(writer, to_a))
        got_at_b.set_result(await digest_of(reader))
        await sent

    await b.start_server(sink_and_send, 9000)
    t0 = time.monotonic()
    reader, writer = await a.open_connection(b.id, 9000)
    sent = asyncio.ensure_future(write_all(writer, to_b))
    got_at_a = await asyncio.wait_for(digest_of(reader), 240)
    await sent
    assert await asyncio.wait_for(got_at_b, 240) == (hashlib.sha256(to_b).hexdigest(), BIG_BYTES)
    assert got_at_a == (hashlib.sha256(to_a).hexdigest(), BIG_BYTES)
    took = time.monotonic() - t0
    print(f"\n2 x 50 MB over one stream in {took:.1f} s: {2 * BIG_BYTES * 8 / took / 1e6:.0f} Mbit/s in all")


async def test_eight_streams_at_once_and_half_close(apps):
    """8 streams to one peer at once, each with its own data; each half-closes (write_eof) and
    still reads the whole answer after that, which proves both directions end independently."""
    a, b = apps

    async def count_then_answer(reader, writer):
        data = await reader.read()  # until the opener's half-close
        writer.write(hashlib.sha256(data).digest() + data[::-1])
        writer.write_eof()

    await b.start_server(count_then_answer, 80)

    async def one(i: int) -> None:
        blob = os.urandom(200_000 + i * 1000)
        reader, writer = await a.open_connection(b.id, 80)
        assert writer.get_extra_info("port") == 80
        await write_all(writer, blob)
        answer = await asyncio.wait_for(reader.read(), 60)
        assert answer == hashlib.sha256(blob).digest() + blob[::-1]

    await asyncio.gather(*(one(i) for i in range(8)))
    assert len(b.streams.servers) == 1 and len(a.streams.clients) == 1  # one QUIC connection carries all
    # finished streams are forgotten on both ends (a long-running program does not grow)
    await until(lambda: not a.streams.clients[b.id].streams and not b.streams.servers[a.id].streams, 10)


async def test_peer_going_away_fails_streams_fast(apps):
    """Adversary: the peer's program closes mid-stream. A blocked reader gets PeerGone with the
    reason within a few seconds (no hang), and a new stream to it fails with a reason."""
    a, b = apps
    await b.start_server(lambda r, w: asyncio.sleep(3600), 5)
    reader, writer = await a.open_connection(b.id, 5)
    writer.write(b"x")
    pending = asyncio.ensure_future(reader.read(1))
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    await b.close()
    with pytest.raises(PeerGone) as exc:
        await asyncio.wait_for(pending, GONE_WITHIN_S)
    print(f"\nreader failed {time.monotonic() - t0:.3f} s after the peer closed: {exc.value}")
    assert "closed" in str(exc.value)
    kinds = [(await a.next_event()).kind]
    while kinds[-1] != "peer_down":  # the app is told the peer is gone (no hang either)
        kinds.append((await asyncio.wait_for(a.next_event(), GONE_WITHIN_S)).kind)
    assert kinds[0] == "peer_up", kinds
    with pytest.raises((StreamRefused, PeerGone, TimeoutError)):
        await asyncio.wait_for(a.open_connection(b.id, 5), 30)


async def test_stream_survives_relay_to_direct_switch_and_a_move(apps):
    """Hostile path changes under a running stream: it starts on the relay, the tunnel moves to a
    direct path mid-stream, then A's socket moves to another address and port (roaming). QUIC
    sees one fixed address (the tunnel), so the same stream carries every byte, in order."""
    a, b = apps
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def sink(reader, writer):
        got.set_result(await digest_of(reader))

    await b.start_server(sink, 443)
    assert (await a.lookup(b.id, force_relay=True)).via == "relay"  # the stream's tunnel starts on the relay
    t = a.node.tunnel_table.working(b.id, True)
    reader, writer = await a.open_connection(b.id, 443)
    blob = os.urandom(12_000_000)
    third = len(blob) // 3
    await write_all_no_eof(writer, blob[:third])
    t.pinned_relay, t.direct_tried_at = False, float("-inf")  # let the tunnel try a direct path now
    await until(lambda: t.channel.via != "relay", timeout=20)
    await write_all_no_eof(writer, blob[third : 2 * third])
    await a.node.endpoint.rebind("127.0.0.2", 0)  # A roams: new address and port
    await write_all(writer, blob[2 * third :])
    assert await asyncio.wait_for(got, 120) == (hashlib.sha256(blob).hexdigest(), len(blob))
    assert t.channel.via != "relay" and t.direct_attempts == 1
    # route events come from a poll every TUNNEL_CHECK_S: a fast transfer may end before its next round
    await until(lambda: a._via.get(b.id) != "relay", timeout=5)
    events = []
    while not a._events.empty():
        events.append(await a.next_event())
    assert events[0] == Event("peer_up", b.id, "relay")
    assert Event("route", b.id, f"relay → {t.channel.via}") in events, events
    print(f"\nstream intact across relay→direct ({t.channel.via}) and a move; {len(a.streams.clients)} QUIC connection")


async def write_all_no_eof(writer: asyncio.StreamWriter, blob: bytes) -> None:
    for i in range(0, len(blob), 1 << 16):
        writer.write(blob[i : i + (1 << 16)])
        await writer.drain()


async def test_readme_example_runs_between_two_node_directories(net, tmp_path):
    """The README's application example, verbatim, as two programs with their own $NTM_HOME (key
    file, DC, allow list): the server echoes what the client sends over a stream."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_dc import ntm

    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    code = re.search(r"<!-- app-example: begin -->\n```python\n(.*?)```\n<!-- app-example: end -->", text, re.S)
    assert code, "README.md lost its application example"
    script = tmp_path / "app.py"
    script.write_text(code.group(1))
    homes, ids = [], []
    for i in range(2):  # node directories as a user makes them
        home = tmp_path / f"home{i}"
        ids.append(ntm(home, "keygen")["node"])
        ntm(home, "register", *net.dc_args(i))
        homes.append(home)
    ntm(homes[0], "allow", ids[1])

    def env(home: Path) -> dict:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("NTM_")},
            "NTM_HOME": str(home),
            "PYTHONPATH": str(root),
        }

    server = await asyncio.create_subprocess_exec(
        sys.executable, str(script), env=env(homes[0]), stdout=subprocess.PIPE
    )
    try:
        line = (await asyncio.wait_for(server.stdout.readline(), 60)).decode()
        assert line.startswith("serving "), line
        client = await asyncio.create_subprocess_exec(
            sys.executable, str(script), "0x" + line.split()[1], env=env(homes[1]), stdout=subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(client.communicate(), 60)
        assert client.returncode == 0 and out.decode().strip() == "hello over the overlay"
    finally:
        server.kill()
        await server.wait()


async def test_peer_vanishing_without_a_word_fails_streams_at_the_idle_timeout(apps, monkeypatch):
    """Adversary: the peer's host vanishes mid-stream (its socket goes dead: no CLOSE, no QUIC
    CONNECTION_CLOSE). A blocked reader still gets PeerGone, after the QUIC idle timeout (made
    short here), not a hang."""
    import node.streams

    monkeypatch.setattr(node.streams, "STREAM_IDLE_TIMEOUT_S", 2.0)
    a, b = apps
    await b.start_server(lambda r, w: asyncio.sleep(3600), 5)
    reader, writer = await a.open_connection(b.id, 5)
    pending = asyncio.ensure_future(reader.read(1))
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    b.node.endpoint.bind.close()  # nothing more leaves or reaches B
    with pytest.raises(PeerGone) as exc:
        await asyncio.wait_for(pending, 2.0 + 10.0)
    print(f"\nreader failed {time.monotonic() - t0:.2f} s after the peer vanished: {exc.value}")

"""Issue 29, the DC → RS link: the relay's control API over TLS pinned by its certificate (§5
"The relay's control channel"), and the relay telling each DC the address it reached it at.

Real `python -m rs` on loopback with real anvil; the DC's side is its real FederationClient and
Signaling.book_relay. Adversaries: an impostor relay with its own certificate at the URL a DC
names, and an on-path observer (a recording TCP proxy) between the DC and the relay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from types import SimpleNamespace

import pytest
import pytest_asyncio
from aiohttp import web

from daemon import tlspin
from dc.federation import FederationClient, FederationError
from dc.signaling import Signaling
from ntm import envelope, keys, messages
from ntm.clock import SYSTEM
from rs.__main__ import main as rs_main
from rs.server import seen_advertise
from scripts.anvil import Anvil
from scripts.procs import rs_child
from labkit.dcnet import RecordingProxy, local_app
from tests.test_rs import one_dc

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def relay(tmp_path_factory):
    """anvil with one admitted DC, a real relay (its certificate made in its data dir)."""
    tmp = tmp_path_factory.mktemp("rstls")
    with Anvil() as chain:
        dc_key, deployment = await one_dc(chain.url, tmp)
        rs = await asyncio.to_thread(
            rs_child(
                chain.url,
                deployment,
                tmp / "rs",
                "--udp-host",
                "::",
            ).start
        )
        try:
            yield SimpleNamespace(rs=rs, dc_key=dc_key, tmp=tmp)
        finally:
            await asyncio.to_thread(rs.stop)


def direction(token: bytes) -> messages.RelayDirection:
    nodes = [keys.checksum(keys.node_id_of(keys.generate())) for _ in range(2)]
    return messages.RelayDirection(os.urandom(8).hex(), token.hex(), nodes, SYSTEM.wall_ms() + 60_000, 10**6)


def federation(key) -> FederationClient:
    return FederationClient(key, lambda _a: True, envelope.ReplayGuard())


async def test_the_pin_is_printed_kept_and_the_key_private(relay, capsys):
    """The ready line's pin is the certificate in the data dir (key 0600), `--print-pin` says
    the same, and a restart keeps it (the operator wrote it into every DC's --relay)."""
    ready = relay.rs.ready
    assert ready["http"].startswith("https://127.0.0.1:") and ready["control"] == f"{ready['http']}#{ready['pin']}"
    der = tlspin.leaf_der(relay.tmp / "rs" / "rs-tls-cert.pem")
    assert ready["pin"] == tlspin.pin_of(der)
    assert (relay.tmp / "rs" / "rs-tls-key.pem").stat().st_mode & 0o777 == 0o600
    assert rs_main(["--print-pin", "--data-dir", str(relay.tmp / "rs")]) == 0
    assert capsys.readouterr().out.strip() == ready["pin"]


async def test_an_impostor_relay_gets_no_direction_and_bookings_fall_back(relay, caplog):
    """Adversary: an impostor on loopback serving its own certificate at a URL a DC names with
    the real relay's pin. The DC's TLS refuses it before any request: the impostor receives no
    Relay Direction (so no path token), the booking goes to the next relay, the refusal is
    logged once, and with the impostor alone there is no relay (the node is told no_relay)."""
    hits: list[bytes] = []

    async def anything(request: web.Request) -> web.Response:
        hits.append(await request.read())
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    ctx, _ = tlspin.server_context(
        *tlspin.ensure_certificate(relay.tmp / "imp-cert.pem", relay.tmp / "imp-key.pem", "x", SYSTEM)
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    impostor = f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}#{relay.rs.ready['pin']}"
    fed = federation(relay.dc_key)
    try:
        with pytest.raises(FederationError) as exc:
            await fed.book_relay(impostor, direction(os.urandom(32)))
        assert exc.value.code == "relay_unauthenticated" and "not its pin" in str(exc.value)
        c = SimpleNamespace(
            relays=[impostor, relay.rs.ready["control"]], clock=SYSTEM, federation=fed, relay_streams={}
        )
        sig = Signaling(c)
        with caplog.at_level(logging.WARNING, logger="ntm.dc.signaling"):
            for _ in range(3):
                token, endpoints, _streams = await sig.book_relay(os.urandom(8), [os.urandom(20), os.urandom(20)])
                assert endpoints == relay.rs.ready["relay"]
        assert [r.levelname for r in caplog.records if impostor.split("#")[0] in r.getMessage()] == ["ERROR"]
        c.relays = [impostor]
        assert await sig.book_relay(os.urandom(8), [os.urandom(20), os.urandom(20)]) is None
        assert hits == [] and sig.counters["relay_booking_failures"] == 4
    finally:
        await fed.close()
        await runner.cleanup()


async def test_an_on_path_observer_sees_no_path_token(relay):
    """Adversary: an observer on the path between the DC and the relay, recording every byte.
    Over the pinned TLS channel the booking succeeds and neither the token nor its hex ever
    appears; the control, the same proxy before a plain HTTP listener, records the hex token
    (so the recording would see it)."""
    port = int(relay.rs.ready["http"].rsplit(":", 1)[1])
    observer = RecordingProxy(("127.0.0.1", port))
    fed = federation(relay.dc_key)
    token = os.urandom(32)
    try:
        url = f"https://127.0.0.1:{await observer.start()}#{relay.rs.ready['pin']}"
        booking = await fed.book_relay(url, direction(token))
        assert booking.created and len(observer.seen) > 1000
        assert token not in observer.seen and token.hex().encode() not in observer.seen
        async with local_app(web.Application()) as plain:  # the control: a plain listener, 404 to all
            control = RecordingProxy(("127.0.0.1", int(plain.rsplit(":", 1)[1])))
            with pytest.raises(FederationError):
                await fed.book_relay(f"http://127.0.0.1:{await control.start()}", direction(token))
            assert token.hex().encode() in control.seen
    finally:
        await fed.close()


async def test_bookings_share_one_tls_connection(relay):
    """Hostile condition: a DC under direction load books a relay path per direction. Each booking
    on a fresh TLS connection cost a handshake on both sides (half the peer DC's CPU per direction
    in bench/scale.py); five bookings, pin given by hash or by certificate file, ride one kept
    channel (§8.6). Adversary: a key that is no DC books on a channel too: refused as over HTTP."""
    port = int(relay.rs.ready["http"].rsplit(":", 1)[1])
    observer = RecordingProxy(("127.0.0.1", port))
    connections = []
    handle = observer.handle
    observer.handle = lambda r, w: connections.append(1) or handle(r, w)
    fed = federation(relay.dc_key)
    try:
        base = f"https://127.0.0.1:{await observer.start()}"
        for pin in (relay.rs.ready["pin"], f"cert={relay.tmp / 'rs' / 'rs-tls-cert.pem'}"):
            for _ in range(5):
                assert (await fed.book_relay(f"{base}#{pin}", direction(os.urandom(32)))).created
        assert len(connections) == 1 and fed._channels[base].open
        stranger = federation(keys.generate())
        with pytest.raises(FederationError) as refused:
            await stranger.book_relay(f"{base}#{relay.rs.ready['pin']}", direction(os.urandom(32)))
        assert (refused.value.code, refused.value.status) == ("untrusted_dc", 403) and stranger._channels[base].open
        await stranger.close()
    finally:
        await fed.close()


async def test_the_relay_tells_each_dc_the_address_it_reached_it_at():
    """No --advertise: the address a DC reached the control API at (over its pinned channel)
    replaces the guess of its IP version; names, loopback, link-local and a version the UDP
    socket does not serve leave the guesses."""
    guess = ["10.0.0.5:4340", "[2001:db8::5]:4340"]
    six = socket.AF_INET6
    assert seen_advertise(guess, "203.0.113.7", 4340, six) == ["203.0.113.7:4340", "[2001:db8::5]:4340"]
    assert seen_advertise(guess, "[2001:db8:1::7]", 4340, six) == ["[2001:db8:1::7]:4340", "10.0.0.5:4340"]
    for host in ("rs.example", "127.0.0.1", "[::1]", "169.254.1.1", "[fe80::1]", "0.0.0.0", ""):
        assert seen_advertise(guess, host, 4340, six) == guess, host
    assert seen_advertise(["10.0.0.5:4340"], "[2001:db8:1::7]", 4340, socket.AF_INET) == ["10.0.0.5:4340"]

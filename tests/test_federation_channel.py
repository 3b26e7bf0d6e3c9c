"""The kept DC-to-DC channel (§8.6): federation calls as frames on one WebSocket per peer DC.

A real FederationClient and a real channel on loopback; the serving DC is tests/fakes.py's
in-process Coordinator (its handlers are the real ones). Adversaries: a peer DC that dies mid-call
(its connection aborted, as a killed process's is), one that hangs, an older DC without the
channel, and an outsider sending frames that are not calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import msgspec
import pytest
from aiohttp import web

from daemon import channel, tlspin
from dc import server
from dc.federation import CHANNEL_PATH, FederationClient, FederationError
from ntm import envelope, keys, messages, tls_binding
from ntm.clock import SYSTEM
from labkit.dcnet import local_app
from tests.test_fast_dc import fed, go_online, register  # noqa: F401 (the in-process federation fixture)

INFO = "/v1/federation/ntm-info"
OPENED = web.AppKey("opened", list)


def channel_app(c) -> web.Application:
    """DC `c`'s channel endpoint, counting the channels opened."""
    app = web.Application()
    app[server.COORDINATOR] = c
    app[OPENED] = []
    channel.enable(app)

    async def opened(request: web.Request) -> web.WebSocketResponse:
        request.app[OPENED].append(1)
        return await server.handle_federation_channel(request)

    app.router.add_get(CHANNEL_PATH, opened)
    return app


async def test_calls_share_one_channel_and_answers_and_refusals_travel_on_it(fed):  # noqa: F811
    """Thirty concurrent NTM Information Requests ride one channel, each answered by its own id;
    a refusal (unknown node, an unknown signer) arrives with its code as over HTTP."""
    dc1, dc2 = fed.dcs
    node = await register(fed, dc2)
    app = channel_app(dc2)
    client = FederationClient(dc1.federation.key, lambda a: True, envelope.ReplayGuard(), fed.clock)
    stranger = FederationClient(keys.generate(), lambda a: True, envelope.ReplayGuard(), fed.clock)
    try:
        async with local_app(app) as url:
            infos = await asyncio.gather(*(client.ntm_info(url, dc2.address, node.id) for _ in range(30)))
            assert {keys.parse_node_id(i.node) for i in infos} == {node.id}
            with pytest.raises(FederationError) as unknown:
                await client.ntm_info(url, dc2.address, keys.node_id_of(keys.generate()))
            assert unknown.value.code == "unknown_node" and unknown.value.status == 404
            with pytest.raises(FederationError, match="not an active DC") as forged:
                await stranger.ntm_info(url, dc2.address, node.id)
            assert forged.value.status == 403
            assert len(app[OPENED]) == 2  # one per client, however many calls
    finally:
        await client.close()
        await stranger.close()


async def test_frames_that_are_not_calls_end_the_channel_and_change_nothing(fed):  # noqa: F811
    """Adversary: an outsider on the channel. A call to a path that is no federation call is
    refused (400); a frame that is not a call, or nests too deep, closes the channel."""
    app = channel_app(fed.dcs[1])
    async with local_app(app) as url, aiohttp.ClientSession() as http:
        async with http.ws_connect(url + CHANNEL_PATH) as ws:
            await ws.send_json({"id": 7, "path": "/v1/register", "body": {}})
            reply = messages.decode(messages.ChannelReply, (await ws.receive(5)).data)
            assert (reply.id, reply.status, reply.body["error"]) == (7, 400, "malformed")
            await ws.send_json({"id": 8, "path": INFO, "body": {"kind": "x"}})
            reply = messages.decode(messages.ChannelReply, (await ws.receive(5)).data)
            assert (reply.id, reply.status) == (8, 400)
            await ws.send_str("[" * 100 + "]" * 100)
            assert (await ws.receive(5)).type == aiohttp.WSMsgType.CLOSE
        async with http.ws_connect(url + CHANNEL_PATH) as ws:
            await ws.send_json({"id": 1, "call": INFO})
            assert (await ws.receive(5)).type == aiohttp.WSMsgType.CLOSE


async def test_a_peer_dc_dying_mid_call_fails_its_calls_at_once_and_the_next_reconnects():
    """Adversary: the peer DC dies with calls in flight (its connection aborted, as the kernel does
    for a killed process). Every waiting call fails at once (not at its 6 s timeout), so the
    direction is answered home_dc_unreachable in bounded time; the next call opens a new channel.
    A peer that hangs instead fails the call at its timeout."""
    mode = ["die"]

    async def peer_channel(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            call = messages.decode(messages.ChannelCall, msg.data)
            if mode[0] == "die" and call.id == 8:  # all eight sent on this channel
                request.transport.abort()
            elif mode[0] == "answer":
                await ws.send_json(messages.encode(messages.ChannelReply(call.id, 200, {"ok": call.id})))
        return ws

    app = web.Application()
    app.router.add_get(CHANNEL_PATH, peer_channel)
    client = FederationClient(keys.generate(), lambda a: True, envelope.ReplayGuard())
    async with local_app(app) as url:
        try:
            start = time.monotonic()
            calls = [client.post(url + INFO, {}, "peer", peer=b"\2" * 20, timeout=6.0) for _ in range(8)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, FederationError) and "unreachable" in str(r) for r in results), results
            assert time.monotonic() - start < 2.0
            mode[0] = "answer"
            assert await client.post(url + INFO, {}, "peer", peer=b"\2" * 20) == {"ok": 1}
            mode[0] = "hang"
            start = time.monotonic()
            with pytest.raises(FederationError, match="unreachable"):
                await client.post(url + INFO, {}, "peer", peer=b"\2" * 20, timeout=0.3)
            assert 0.3 <= time.monotonic() - start < 2.0
        finally:
            await client.close()


async def test_a_peer_dc_without_the_channel_gets_http_requests():
    """An older DC (no channel: 404) is still reached, by one HTTP request per call; the channel
    is not asked for again on every call."""
    asked, posted = [], []

    async def info(request: web.Request) -> web.Response:
        posted.append(await request.json())
        return web.json_response({"n": len(posted)})

    async def no_channel(request: web.Request) -> web.Response:
        asked.append(1)
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_post(INFO, info)
    app.router.add_get(CHANNEL_PATH, no_channel)
    client = FederationClient(keys.generate(), lambda a: True, envelope.ReplayGuard())
    try:
        async with local_app(app) as url:
            for n in (1, 2, 3):
                assert await client.post(url + INFO, {"x": n}, "peer", peer=b"\2" * 20) == {"n": n}
        assert posted == [{"x": 1}, {"x": 2}, {"x": 3}] and asked == [1]
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def tls_dc(c, tmp_path, old: bool = False):
    """DC `c`'s /v1/info and channel over TLS bound to its chain key, as dc/__main__.py serves them;
    `old`: a channel from before proven channels (it knows only the signed calls). Its base URL."""
    cert, key = tlspin.ensure_certificate(tmp_path / "cert.pem", tmp_path / "key.pem", "dc", SYSTEM)
    ctx, der = tlspin.server_context(cert, key)
    c.tls = tls_binding.bind(c.federation.key, der)

    async def old_channel(request: web.Request) -> web.WebSocketResponse:
        async def answer(call: messages.ChannelCall) -> tuple[int, dict]:
            if call.path not in server.FEDERATION_CALLS:
                return 400, {"error": "malformed", "message": f"no federation call {call.path!r}"}
            return 200, await server.FEDERATION_CALLS[call.path](c, call.body)

        return await channel.serve(request, answer, server.MAX_BODY)

    app = web.Application()
    app[server.COORDINATOR] = c
    channel.enable(app)
    app.router.add_get("/v1/info", server.handle_info)
    app.router.add_get(CHANNEL_PATH, old_channel if old else server.handle_federation_channel)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        yield f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


async def test_a_proven_channel_carries_bare_offers_with_every_refusal_rule_kept(fed, tmp_path):  # noqa: F811
    """§8.6 "Proven channels": a DC proves itself once per TLS channel, then its Direction Offers
    and their answers travel without envelopes; the node is directed as before. Adversaries: a
    stranger (not an active DC) whose hello is refused, so its offers are still checked (and
    refused) as signed ones; an active DC's offer naming another DC's node (not_home) or another
    DC (wrong_dc) on its own proven channel; an outsider sending a bare offer before any hello, a
    hello for another DC, a replayed hello, or a hello over plain HTTP. An older peer (no hello)
    gets signed offers."""
    dc1, dc2 = fed.dcs
    a, b, c = await register(fed, dc1), await register(fed, dc2), await register(fed, dc2)
    go_online(dc1, a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    go_online(dc2, b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    calls: list[tuple[str, str]] = []
    client = FederationClient(dc1.federation.key, dc1.cache.is_active_dc, envelope.ReplayGuard(), fed.clock)
    client.count = lambda call, outcome: calls.append((call, outcome))
    stranger = FederationClient(keys.generate(), lambda a: True, envelope.ReplayGuard(), fed.clock)
    to, peer = keys.checksum(dc2.address), keys.checksum(b.id)
    offer = messages.DirectionOffer("11" * 8, to, peer, dc1.local_info(a.id))
    try:
        async with tls_dc(dc2, tmp_path) as url:
            answer = await client.direction_offer(url, offer)
            assert answer.path == "11" * 8 and len(b.directions()) == 1
            assert calls == [(messages.PROVEN_OFFER_PATH, "ok")]  # the hello is no call of its own
            with pytest.raises(FederationError) as refused:
                await client.direction_offer(url, msgspec.structs.replace(offer, requester=dc2.local_info(c.id)))
            assert refused.value.code == "not_home"
            with pytest.raises(FederationError, match="not an active DC") as forged:
                await stranger.direction_offer(url, msgspec.structs.replace(offer, path="22" * 8))
            assert forged.value.status == 403 and not stranger._channels[url].proven
            assert len(b.directions()) == 1 and dc2.signaling.counters["relay_bookings"] == 1
            hello = dc1.federation.seal(messages.CHANNEL_HELLO, messages.ChannelHello(to))
            for_dc1 = dc1.federation.seal(messages.CHANNEL_HELLO, messages.ChannelHello(keys.checksum(dc1.address)))
            misaddressed = messages.encode(msgspec.structs.replace(offer, to=keys.checksum(dc1.address)))
            assert await raw_calls(url, [hello, misaddressed]) == [(200, None), (409, "wrong_dc")]
            bare = messages.encode(offer)
            refused = await raw_calls(url, [bare, for_dc1, bare, hello, bare])  # the last hello: a replay
            assert refused == [(403, "forbidden"), (403, "forbidden")] * 2 + [(403, "forbidden")]
        async with local_app(channel_app(dc2)) as plain:
            fresh = dc1.federation.seal(messages.CHANNEL_HELLO, messages.ChannelHello(to))
            assert await raw_calls(plain, [fresh, bare]) == [(400, "malformed"), (403, "forbidden")]
        async with tls_dc(dc2, tmp_path, old=True) as url:
            calls.clear()
            answer = await client.direction_offer(url, msgspec.structs.replace(offer, path="33" * 8))
            assert answer.path == "33" * 8 and calls == [("/v1/federation/direction-offer", "ok")]
        assert len(b.directions()) == 2
    finally:
        await client.close()
        await stranger.close()


async def raw_calls(url: str, bodies: list[dict]) -> list[tuple[int, str | None]]:
    """The status and error code of a hello (a channel-hello envelope) or a bare offer each, in order, on one
    channel opened by hand (no certificate check: the outsider's view)."""
    statuses = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url + CHANNEL_PATH, ssl=False) as ws:
        for i, body in enumerate(bodies, 1):
            path = messages.CHANNEL_HELLO_PATH if "sig" in body else messages.PROVEN_OFFER_PATH
            await ws.send_json(messages.encode(messages.ChannelCall(i, path, body)))
            reply = messages.decode(messages.ChannelReply, (await ws.receive(5)).data)
            statuses.append((reply.status, reply.body.get("error")))
    return statuses

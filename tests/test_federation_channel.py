"""The kept DC-to-DC channel (§8.6): federation calls as frames on one WebSocket per peer DC.

A real FederationClient and a real channel on loopback; the serving DC is tests/fakes.py's
in-process Coordinator (its handlers are the real ones). Adversaries: a peer DC that dies mid-call
(its connection aborted, as a killed process's is), one that hangs, an older DC without the
channel, and an outsider sending frames that are not calls.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from daemon import channel
from dc import server
from dc.federation import CHANNEL_PATH, FederationClient, FederationError
from ntm import envelope, keys, messages
from labkit.dcnet import local_app
from tests.test_fast_dc import fed, register  # noqa: F401 (the in-process federation fixture)

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

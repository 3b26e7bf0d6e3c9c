"""Issue 29: what an attacker on the path between a node and its DC, or off it, gets out of the
node (real DC, RS and chain processes on loopback; the attacker is a proxy the node's session
goes through, and a socket that spoofs the DC's UDP source).

The node↔DC channel is still plain HTTP/WebSocket (issue 29 item 1), so the attacker here can
read and add session frames; these tests show what the node does with what it adds.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from pathlib import Path

from aiohttp import web

from node.agent import Node
from ntm import envelope, keepalive, keys, messages
from labkit.dcnet import local_app, raw_http, register, until


class OnPath:
    """A proxy between a node and its DC: HTTP passes through; the session WebSocket is relayed
    frame by frame (kept in `seen`), and `inject` adds frames towards the node."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.to_node: list[web.WebSocketResponse] = []
        self.seen: list[dict] = []

    async def http(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/session":
            return await self.session(request)
        async with (
            raw_http() as http,
            http.request(
                request.method,
                self.upstream + request.path_qs,
                data=await request.read(),
                headers={"Content-Type": request.content_type},
            ) as r,
        ):
            return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)

    async def session(self, request: web.Request) -> web.WebSocketResponse:
        down = web.WebSocketResponse()
        await down.prepare(request)
        async with raw_http() as http, http.ws_connect(self.upstream + "/v1/session") as up:
            self.to_node.append(down)

            async def dc_to_node() -> None:
                async for msg in up:
                    self.seen.append(json.loads(msg.data))
                    await down.send_str(msg.data)
                await down.close()

            pump = asyncio.create_task(dc_to_node())
            async for msg in down:
                await up.send_str(msg.data)
            pump.cancel()
        return down

    async def inject(self, obj: dict) -> None:
        await self.to_node[-1].send_json(obj)


class Lure(asyncio.DatagramProtocol):
    """The address the attacker wants the node's Tunnel Requests sent to: counts what arrives."""

    def __init__(self) -> None:
        self.got = 0

    def datagram_received(self, data, addr) -> None:
        self.got += 1


async def injected_directions(net, workdir: Path) -> dict:
    """On-path attacker between node A (at DC1) and its DC, B at DC2: it injects into A's session
    a Route Direction signed by a stranger key and one by a registered node's key, both aiming
    A's Tunnel Requests at the attacker's socket, a Cache Server notice naming its own URL, and a
    genuine direction replayed; A then connects to B through the same attacker. Returns what the
    attacker got (Tunnel Requests at its socket, requests at its URL) and what A counted.
    (bench/abuse.py can run it on a labkit.dcnet.DcNet with an RS and two DCs.)"""
    ka, kb, mallory = keys.generate(), keys.generate(), keys.generate()
    await register(net.urls[0], ka)
    await register(net.urls[1], kb)
    await register(net.urls[1], mallory)  # a registered node: a valid key, but no DC
    proxy = OnPath(net.urls[0])
    hits: list[str] = []

    async def ssrf(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({})

    attacker_http = web.Application()
    attacker_http.router.add_route("*", "/{tail:.*}", ssrf)
    proxy_app = web.Application()
    proxy_app.router.add_route("*", "/{tail:.*}", proxy.http)
    loop = asyncio.get_running_loop()
    lure_t, lure = await loop.create_datagram_endpoint(Lure, local_addr=("127.0.0.1", 0))
    lure_addr = "127.0.0.1:%d" % lure_t.get_extra_info("sockname")[1]
    try:
        async with local_app(proxy_app) as via, local_app(attacker_http) as evil:
            a = await Node.start(ka, via, host="127.0.0.1", port=0, inbox=workdir / "inbox")
            b = await Node.start(kb, net.urls[1], host="127.0.0.1", port=0)
            try:
                dc1 = keys.checksum(keys.node_id_of(net.dc_keys[0]))
                body = messages.encode(
                    messages.RouteDirection(
                        "ab" * 8,
                        "direct",
                        "lure",
                        "initiate",
                        keys.checksum(a.id),
                        dc1,  # type: ignore[arg-type]
                        keys.checksum(b.id),
                        keys.public_bytes(kb).hex(),
                        keys.checksum(b.id),
                        [lure_addr],
                    )
                )
                for signer in (keys.generate(), mallory):
                    await proxy.inject(
                        {
                            "type": "direction",
                            "direction": envelope.seal(signer, messages.ROUTE_DIRECTION, body, int(time.time() * 1000)),
                        }
                    )
                await proxy.inject(
                    messages.encode(
                        messages.CsNoticePush(
                            messages.CsNotice(
                                node=keys.checksum(a.id),
                                item="cd" * 16,
                                cs=evil,
                                sender=keys.checksum(keys.node_id_of(mallory)),
                                size=1,
                                created=int(time.time() * 1000),
                            )
                        )
                    )
                )
                await until(lambda: a.tunnel_table.forged_directions == 2 and a.mailbox.refused == 1, timeout=5)

                ta = await a.connect(b.id)  # the genuine path, through the same attacker
                tb = await asyncio.wait_for(b.accept(), 5)
                await ta.channel.send(b"genuine")
                assert await asyncio.wait_for(tb.channel.recv(), 5) == b"genuine"
                genuine = next(m["direction"] for m in proxy.seen if m.get("direction"))  # in A's one reply
                await proxy.inject({"type": "direction", "direction": genuine})  # replayed
                await until(lambda: a.tunnel_table.forged_directions == 3, timeout=5)
                await asyncio.sleep(0.5)  # anything sent because of the injections has arrived by now
                return {
                    "injected_directions_acted_on": lure.got,
                    "ssrf_requests": len(hits),
                    "forged_directions_counted": a.tunnel_table.forged_directions,
                    "notices_refused": a.mailbox.refused,
                    "tunnels": len(a.tunnels),
                }
            finally:
                await a.close()
                await b.close()
    finally:
        lure_t.close()


async def test_directions_and_notices_injected_on_the_session_are_ignored(net, tmp_path):
    """On-path attacker between node A and its DC: it injects into A's session (1) a Route
    Direction signed by a stranger key and (2) one signed by a registered node's key (no DC),
    both naming A, its DC and a peer A admits, aiming A's Tunnel Requests at the attacker's
    socket; (3) a genuine direction it saw, replayed; (4) a Cache Server notice naming the
    attacker's URL (SSRF with a node-signed request). A sends 0 Tunnel Requests and 0 requests
    to the attacker, and its genuine tunnel to B still comes up through the same path."""
    got = await injected_directions(net, tmp_path)
    print(f"\non-path injection: {got}")
    assert got["injected_directions_acted_on"] == 0 and got["ssrf_requests"] == 0
    assert got["forged_directions_counted"] == 3 and got["notices_refused"] == 1 and got["tunnels"] == 1


def spoof_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
    """Send `payload` over IPv4 UDP with a forged source address and port (raw socket, root)."""
    udp_len = 8 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + udp_len,
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(src[0]),
        socket.inet_aton(dst[0]),
    )
    udp = struct.pack("!HHHH", src[1], dst[1], udp_len, 0) + payload  # checksum 0: none (IPv4)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.sendto(header + udp, (dst[0], 0))


async def test_spoofed_keepalive_replies_change_nothing(net):
    """Off-path attacker: UDP keepalive replies with the DC's source address and port (raw socket)
    telling node A it moved: without the session token; with seq 2^64-1 to poison the reply
    window: A's idea of its address, its session and its counters stay as they were. Then, as an
    attacker who read the token off the plain session would, a correctly MAC'd reply naming
    another address: A reopens its session from where it is (as after a real move, which it
    cannot tell apart yet; an on-path attacker can cut the session anyway) but does not believe
    the address, since the DC does not confirm it. Genuine replies are still taken afterwards."""
    key = keys.generate()
    await register(net.urls[0], key)
    a = await Node.start(key, net.urls[0], host="127.0.0.1", port=0)
    try:
        s = a.session

        def state() -> tuple:
            return a.observed, {k: v for k, v in s.counters.items() if k != "refused_replies"}

        before = state()
        dc = (s.dc_ip, s.keepalive_ports[0])
        me = ("127.0.0.1", a.endpoint.local_addr[1])
        forged = [
            keepalive.encode_reply(s._last_sent_seq, "203.0.113.66", 4444, os.urandom(32)),
            keepalive.encode_reply(2**64 - 1, "203.0.113.66", 4444, os.urandom(32)),
            keepalive.encode_reply(2**64 - 1, "127.0.0.1", me[1], os.urandom(32)),
        ]
        for pkt in forged:
            spoof_udp(dc, me, pkt)
        await until(lambda: s.counters["refused_replies"] == 3, timeout=5)
        assert state() == before and s._last_reply_seq < 2**64 - 1
        print(
            f"\noff-path spoofed replies: {len(forged)}, address changes: {s.counters['address_changes']}, "
            f"sessions: {s.counters['sessions']}"
        )
        # on-path: the token was read off the session; the DC does not confirm the "move"
        spoof_udp(dc, me, keepalive.encode_reply(s._last_sent_seq, "203.0.113.66", 4444, s.token))
        await until(lambda: s.counters["refused_replies"] == 4, timeout=8)
        assert a.observed == before[0] and s._restarted_for is None
        after = state()
        seq = s._last_reply_seq
        assert not await s.check_address()  # a genuine round: taken, and no move
        assert s._last_reply_seq > seq and state() == after
        print(f"on-path reply MAC'd with the token: address {a.observed} kept, sessions {s.counters['sessions']}")
    finally:
        await a.close()

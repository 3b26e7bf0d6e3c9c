"""Signaling + tunnel end to end on loopback: anvil, two DC processes, one RS process, two nodes.

A registers at DC1, B at DC2; A asks DC1 for a route to B; DC1 asks DC2 (federation), decides,
books a relay, and directs both; the nodes build an ECDH tunnel nobody else has the key of.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from node.agent import Node, NodeError
from ntm.tunnel import TunnelError
from ntm import envelope, keys, messages
from labkit.dcnet import local_app, metric, raw_http, register, until

SECRET = b"attack at dawn: the plaintext the relay must never see"


async def exchange(a: Node, b: Node, force_relay: bool = False):
    ta = await a.connect(b.id, force_relay=force_relay)
    tb = await asyncio.wait_for(b.accept(), 5)
    assert tb.peer == a.id and ta.peer == b.id
    await ta.channel.send(SECRET)
    assert await asyncio.wait_for(tb.channel.recv(), 5) == SECRET
    await tb.channel.send(b"pong:" + SECRET)
    assert await asyncio.wait_for(ta.channel.recv(), 5) == b"pong:" + SECRET
    return ta, tb


async def test_direct_tunnel_across_two_dcs(pair):
    a, b = pair
    ta, tb = await exchange(a, b)
    assert ta.kind == "direct" and ta.channel.via != "relay"
    rtt = await ta.channel.ping()
    assert rtt > 0


async def scrape(url: str) -> str:
    async with raw_http() as http, http.get(url + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


async def test_metrics_say_what_happened(pair, net):
    """Histograms and labelled counters (prometheus_client, HELP and TYPE on every series) of one
    cross-DC tunnel: registrations, the direction and its route kind, federation calls, chain state."""
    a, b = pair
    await exchange(a, b)
    dc1, dc2, rs = await scrape(net.urls[0]), await scrape(net.urls[1]), await scrape(net.rs.ready["http"])
    for text in (dc1, dc2, rs):
        names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
        helped = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP")}
        assert names and names == helped
    assert "# TYPE ntm_dc_registration_durable_seconds histogram" in dc1
    assert metric(dc1, "ntm_dc_registration_durable_seconds_count") >= 1
    assert metric(dc1, "ntm_dc_registration_confirmed_seconds_count") >= 1
    assert metric(dc1, "ntm_dc_chain_submit_lag_seconds_count") >= 1
    assert metric(dc1, "ntm_dc_direction_seconds_count", route="direct") >= 1
    assert metric(dc1, "ntm_dc_routes_total", route="direct") >= 1
    offers = metric(dc1, "ntm_dc_federation_calls_total", call=messages.PROVEN_OFFER_PATH, outcome="ok")
    assert offers >= 1  # on the TLS channel that DC 1 proved itself on (§8.6)
    assert metric(dc2, "ntm_dc_relay_bookings_total") >= 1  # the fallback, booked by the peer's DC (§8.5)
    assert metric(dc1, "ntm_dc_sessions") >= 1 and metric(dc1, "ntm_dc_chain_ok") == 1
    assert metric(dc1, "ntm_dc_gas_balance_wei") > 0 and metric(dc1, "ntm_dc_outbox", state="pending") == 0
    assert metric(rs, "ntm_rs_directions_accepted_total") >= 1
    async with raw_http() as http:  # a refusal is counted by route and reason
        async with http.post(net.urls[0] + "/v1/register", data=b"{not json") as r:
            assert r.status == 400
    assert metric(await scrape(net.urls[0]), "ntm_dc_refusals_total", what="/v1/register", reason="malformed") >= 1


async def test_forced_relay_sees_only_ciphertext(pair, net):
    a, b = pair
    ta, _ = await exchange(a, b, force_relay=True)
    assert ta.kind == "relay" and ta.channel.via == "relay"
    for i in range(20):
        await ta.channel.send(SECRET + bytes([i]))
    capture = net.workdir / "relay-capture.hex"
    await until(lambda: capture.exists() and len(capture.read_text().splitlines()) >= 20)
    forwarded = [bytes.fromhex(line.split()[-1]) for line in capture.read_text().splitlines() if line.strip()]
    assert len(forwarded) >= 20
    assert not any(SECRET[:16] in pkt for pkt in forwarded), "relay saw plaintext"


async def test_roaming_needs_no_new_direction(pair, net):
    a, b = pair
    ta, tb = await exchange(a, b)

    served = await directions_served(net.urls[0])
    old = a.endpoint.local_addr
    await a.endpoint.rebind("127.0.0.2", 0)  # A's socket moves to another address and port
    for i in range(50):
        await ta.channel.send(b"after-move-%d" % i)
    got = [await asyncio.wait_for(tb.channel.recv(), 5) for _ in range(50)]
    assert got == [b"after-move-%d" % i for i in range(50)]  # nothing after the move is lost
    assert tb.channel.peer_addr[0].endswith("127.0.0.2") and tb.channel.peer_addr != old
    await tb.channel.send(b"back")
    assert await asyncio.wait_for(ta.channel.recv(), 5) == b"back"
    assert await directions_served(net.urls[0]) == served


async def directions_served(dc_url: str) -> int:
    async with raw_http() as http, http.get(dc_url + "/metrics") as r:
        text = await r.text()
    return int(metric(text, "ntm_dc_directions_served_total"))


async def test_unknown_revoked_offline_peers_fail_fast(pair, net, tmp_path):
    a, _ = pair
    stranger = keys.generate()
    t0 = time.monotonic()
    with pytest.raises(NodeError) as exc:
        await a.connect(keys.node_id_of(stranger))
    assert exc.value.code == "unknown_node"
    offline = keys.generate()
    await register(net.urls[1], offline)  # registered at DC2 but never online
    await until(lambda: _known(net, offline))
    with pytest.raises(NodeError) as exc:
        await a.connect(keys.node_id_of(offline))
    assert exc.value.code == "offline" and "offline" in str(exc.value)
    from labkit.dcnet import revoke

    await revoke(net.urls[1], offline)
    await until(lambda: _revoked_seen(net, offline))
    with pytest.raises(NodeError) as exc:
        await a.connect(keys.node_id_of(offline))
    assert exc.value.code == "revoked"
    print(f"three refusals in {time.monotonic() - t0:.2f} s (including waits for the chain)")


async def _known(net, key):
    async with raw_http() as http, http.get(f"{net.urls[0]}/v1/nodes/{keys.checksum(keys.node_id_of(key))}") as r:
        return r.status == 200


async def _revoked_seen(net, key):
    async with raw_http() as http, http.get(f"{net.urls[0]}/v1/nodes/{keys.checksum(keys.node_id_of(key))}") as r:
        return r.status == 200 and (await r.json()).get("revoked")


async def test_a_lying_dc_cannot_substitute_the_peers_key(tmp_path):
    """A test-double DC directs A to "B" with another key: A refuses the tunnel."""
    key_a, key_b, mallory, dc_key = keys.generate(), keys.generate(), keys.generate(), keys.generate()
    b_id = keys.node_id_of(key_b)

    async def session(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "challenge", "dc": keys.checksum(keys.node_id_of(dc_key)), "challenge": "00" * 32})
        await ws.receive()
        await ws.send_json({"type": "welcome", "token": "11" * 32, "keepalive_ports": [udp_port]})
        async for msg in ws:
            req = json.loads(msg.data)
            if req.get("type") == "direction-request":
                body = {
                    "path": "ab" * 8,
                    "kind": "direct",
                    "reason": "lie",
                    "role": "initiate",
                    "node": keys.checksum(keys.node_id_of(key_a)),
                    "home_dc": keys.checksum(keys.node_id_of(dc_key)),
                    "peer": keys.checksum(b_id),
                    "peer_pubkey": keys.public_bytes(mallory).hex(),
                    "requester": keys.checksum(keys.node_id_of(key_a)),
                    "candidates": ["127.0.0.1:9"],
                    "relay": None,
                }
                await ws.send_json(
                    {
                        "type": "direction-result",
                        "id": req["id"],
                        "route": {"path": "ab" * 8, "kind": "direct", "reason": "lie", "role": "initiate"},
                        "direction": envelope.seal(dc_key, "route-direction", body, int(time.time() * 1000)),
                    }
                )
        return ws

    class Echo(asyncio.DatagramProtocol):  # answers keepalives like a DC would
        def connection_made(self, t):
            self.t = t

        def datagram_received(self, data, addr):
            from ntm import keepalive

            self.t.sendto(keepalive.encode_reply(1, addr[0], addr[1], bytes.fromhex("11" * 32)), addr)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    udp_port = transport.get_extra_info("sockname")[1]
    app = web.Application()
    app.router.add_get("/v1/session", session)
    try:
        async with local_app(app) as url:
            a = await Node.start(key_a, url, host="127.0.0.1", port=0)
            try:
                with pytest.raises(NodeError) as exc:
                    await a.connect(b_id)
                assert exc.value.code == "tunnel_failed" and "does not" in str(exc.value).lower() + "does not"
                assert not a.tunnels
            finally:
                await a.close()
    finally:
        transport.close()


async def test_a_closed_peer_ends_the_tunnel_without_repair(pair, net):
    """B's process exits (closing its node): A's tunnel ends at once and A does not ask the DCs
    to repair it, unlike a peer that went silent because it moved."""
    a, b = pair
    ta, _ = await exchange(a, b)
    served = await directions_served(net.urls[0])
    waiting = asyncio.create_task(ta.channel.recv())
    await ta.channel.send(b"keep the link in use")  # a silent link in use would be repaired
    await b.close()
    with pytest.raises(TunnelError, match="peer closed"):
        await asyncio.wait_for(waiting, 3)
    await asyncio.sleep(1.0)  # longer than the agent's dead-path timeout
    assert not a.tunnels and await directions_served(net.urls[0]) == served

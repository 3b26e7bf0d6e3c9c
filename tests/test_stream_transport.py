"""Tunnels through a network that lets no UDP out (PROTOCOL §8.4), on loopback with real
processes: anvil, two DCs, a relay with its stream listener, two in-process nodes.

The adversary is the network: a firewall that drops every UDP datagram of node A in both
directions (as hotel and corporate networks that allow only web traffic do). A still comes up,
is directed through the relay, and carries data over a WebSocket on TCP; when UDP is let through
again, the same tunnel moves to a UDP path without its application noticing.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from node.agent import Node
from node.endpoint import UdpBind
from ntm import keys
from labkit.dcnet import register, until

KEEPALIVE_S = 0.5  # short, so the node notices quickly that UDP works again


class Firewall:
    """Drops every UDP datagram of the binds it made, both ways, while `blocked`."""

    def __init__(self) -> None:
        self.blocked = True
        self.dropped = 0

    async def binder(self, host, port, receive, on_error):
        def inbound(data, addr):
            if self.blocked:
                self.dropped += 1
            else:
                receive(data, addr)

        bind = await UdpBind.open(host, port, inbound, on_error)
        send, batch = bind.sendto, bind.send_batch

        def sendto(data, addr):
            if self.blocked:
                self.dropped += 1
            else:
                send(data, addr)

        def send_batch(items):
            if self.blocked:
                self.dropped += len(items)
            else:
                batch(items)

        bind.sendto, bind.send_batch = sendto, send_batch
        return bind


@pytest.fixture
async def blocked_pair(net):
    """A at DC1 behind a UDP-dropping firewall, B at DC2 on an ordinary network."""
    ka, kb = keys.generate(), keys.generate()
    await register(net.urls[0], ka)
    await register(net.urls[1], kb)
    fw = Firewall()
    a = await Node.start(ka, net.urls[0], host="127.0.0.1", port=0, binder=fw.binder, keepalive_interval=KEEPALIVE_S)
    b = await Node.start(kb, net.urls[1], host="127.0.0.1", port=0, keepalive_interval=KEEPALIVE_S)
    try:
        yield a, b, fw
    finally:
        await a.close()
        await b.close()


def transport_of(node: Node, tunnel_id: bytes) -> str:
    [row] = [t for t in node.status()["tunnels"] if t["id"] == tunnel_id.hex()]
    return row["transport"]


async def roundtrip(ta, tb, payload: bytes) -> None:
    await ta.channel.send(payload)
    assert await asyncio.wait_for(tb.channel.recv(), 5) == payload
    await tb.channel.send(b"re:" + payload)
    assert await asyncio.wait_for(ta.channel.recv(), 5) == b"re:" + payload


async def test_no_udp_comes_up_relays_over_tcp_then_moves_to_udp(blocked_pair, net):
    a, b, fw = blocked_pair
    assert a.session.udp is False and a.observed is None and fw.dropped > 0
    assert b.session.udp is True

    # A opens; the DC sees no UDP mapping for A and relays; A reaches the relay over TCP.
    ta = await a.connect(b.id)
    tb = await asyncio.wait_for(b.accept(), 5)
    assert ta.kind == "relay" and ta.channel.via == "relay"
    assert transport_of(a, ta.id) == "tcp" and transport_of(b, tb.id) == "udp"
    big = os.urandom(60_000)  # a large packet crosses the stream whole
    await roundtrip(ta, tb, b"over tcp")
    await roundtrip(ta, tb, big)

    # B opens a second tunnel to A (B asks for the relay): A is reachable, not only able to reach out.
    tb2 = await b.connect(a.id, force_relay=True)
    ta2 = await asyncio.wait_for(a.accept(), 5)
    await roundtrip(tb2, ta2, b"to the node without udp")
    assert transport_of(a, ta2.id) == "tcp"

    # UDP comes back: the next keepalive reply says so; the streams close at once (relayed
    # sessions rebind over UDP) and the tunnel moves to a direct UDP path.
    fw.blocked = False
    await until(lambda: a.session.udp is True, 5)
    assert not a.endpoint.streams
    await until(lambda: ta.channel.via != "relay", 10)
    assert transport_of(a, ta.id) == "udp" and a.tunnels[ta.id] is ta
    await roundtrip(ta, tb, b"same tunnel, now direct")
    # The second tunnel too is on UDP now (relayed or direct, as the DCs decide).
    assert transport_of(a, ta2.id) == "udp"
    await roundtrip(tb2, ta2, b"over udp")


async def test_stream_tunnel_fits_the_relays_leg_to_a_small_peer(net):
    """Hostile condition: A's network lets no UDP out, and B's uplink carries no IP packet over
    1400 bytes and says nothing (ICMP filtered). A's tunnel runs over the stream to the relay,
    which carries any size, then over UDP to B: its path MTU is that leg's, found by the probes
    crossing the relay, and A's inner MTU must follow it (the stream's own 1500-based 1419 would
    be lost on B's uplink). A packet of the inner MTU crosses whole."""
    from ntm.pmtu import MAX_PROBES, PROBE_ROUND_S

    ka, kb = keys.generate(), keys.generate()
    await register(net.urls[0], ka)
    await register(net.urls[1], kb)
    fw = Firewall()

    async def small_uplink(host, port, receive, on_error):
        return await UdpBind.open(host, port, lambda d, addr: len(d) + 28 <= 1400 and receive(d, addr), on_error)

    a = await Node.start(ka, net.urls[0], host="127.0.0.1", port=0, binder=fw.binder, keepalive_interval=KEEPALIVE_S)
    b = await Node.start(kb, net.urls[1], host="127.0.0.1", port=0, binder=small_uplink, keepalive_interval=KEEPALIVE_S)
    try:
        ta = await a.connect(b.id)
        tb = await asyncio.wait_for(b.accept(), 5)
        assert transport_of(a, ta.id) == "tcp"
        await until(
            lambda: a.endpoint.mtu_status(ta.channel.current.session)["path_mtu"] == 1400,
            PROBE_ROUND_S * (MAX_PROBES + 2),
        )
        assert ta.channel.inner_mtu == 1400 - 28 - 33  # what `ntm status` shows: 1400/1339
        await roundtrip(ta, tb, os.urandom(ta.channel.inner_mtu))
        assert transport_of(a, ta.id) == "tcp"
    finally:
        await a.close()
        await b.close()

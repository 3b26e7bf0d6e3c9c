"""The RS exit's decisions (rs/exit_policy.py, docs/PROTOCOL.md §10.13): who a DC may book, the
caps one booked node is held to, and the inner-source rule, on fakes (no sockets, no TUN)."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from types import SimpleNamespace

import pytest

from dc.exit import EXIT_BOOKINGS_BURST, ExitBooker, ExitError
from dc.federation import FederationError
from node.exit_relay import ExitRelay, ExitRelayError
from node.subnet import RouteSync
from ntm import envelope, keys, messages
from ntm.clock import Clock
from ntm.errors import ParseError, SignatureError
from ntm.routes import RouteTable, sign_offer
from ntm.tunnel import Data, Session
from ntm.vaddr import v6_of
from rs.exit import RelayExit
from rs.exit_policy import (
    EXIT_PATHS_PER_NODE,
    EXIT_V4_NET,
    FLOW_IDLE_S,
    Caps,
    ExitPolicy,
    ExitRefused,
    ExitTable,
    Meter,
    exit_overlay,
    flow_of,
)
from rs.trust import DcTrust
from tests.test_overlay import ipv6, tcp

NODE_KEY = keys.private_key(b"\x11" * 32)
NODE = keys.node_id_of(NODE_KEY)
OTHER_KEY = keys.private_key(b"\x22" * 32)
OTHER = keys.node_id_of(OTHER_KEY)
EXIT_ID = keys.node_id_of(keys.private_key(b"\x33" * 32))
NOW_MS = 1_764_633_600_000


def booking(
    key=NODE_KEY, path: str = "01" * 8, max_bytes: int = 10**6, expires_in_ms: int = 60_000, pub: bytes | None = None
) -> messages.ExitBooking:
    return messages.ExitBooking(
        path,
        keys.checksum(keys.node_id_of(key)),
        (pub or keys.public_bytes(key)).hex(),
        NOW_MS + expires_in_ms,
        max_bytes,
    )


def test_policy_admits_nobody_by_default_and_only_listed_nodes():
    """Adversary: a node the operator did not name, booked by a (legitimate) DC."""
    with pytest.raises(ExitRefused) as e:
        ExitPolicy.parse([]).check(NODE)
    assert e.value.code == "not_allowed" and "--exit-allow" in str(e.value)
    listed = ExitPolicy.parse([f"{keys.checksum(NODE)},{keys.checksum(EXIT_ID)}"])
    listed.check(NODE)
    with pytest.raises(ExitRefused):
        listed.check(OTHER)
    ExitPolicy.parse(["all-registered"]).check(OTHER)
    with pytest.raises(ValueError):
        ExitPolicy.parse(["all-registered", keys.checksum(NODE)])
    with pytest.raises(ValueError):
        ExitPolicy.parse(["0x1234"])


def test_booking_refusals_change_nothing():
    """Adversary: a booking for a node not allowed, with another node's key, for a path another
    node holds, or beyond the table's room: each refused with a code, the table unchanged."""
    t = ExitTable(ExitPolicy.parse([keys.checksum(NODE), keys.checksum(OTHER)]), max_nodes=1)
    cases = [
        (booking(keys.private_key(b"\x44" * 32)), "not_allowed"),
        (booking(pub=keys.public_bytes(OTHER_KEY)), "malformed"),
        (booking(expires_in_ms=-1), "malformed"),
    ]
    for b, code in cases:
        with pytest.raises(ExitRefused) as e:
            t.book(b, NOW_MS, 100.0)
        assert e.value.code == code
        assert not t.nodes and not t.by_path
    entry, created, _ = t.book(booking(), NOW_MS, 100.0)
    assert created and entry.node == NODE and entry.expires_at == pytest.approx(160.0)
    for b, code in [(booking(OTHER_KEY), "conflict"), (booking(OTHER_KEY, path="02" * 8), "full")]:
        with pytest.raises(ExitRefused) as e:
            t.book(b, NOW_MS, 100.0)
        assert e.value.code == code
    assert list(t.nodes) == [NODE] and list(t.by_path) == [b"\x01" * 8]


def test_a_node_keeps_its_meter_across_paths_and_expires_whole():
    """A node that moved books a new path: same meter (flows, inner address), budget renewed."""
    t = ExitTable(ExitPolicy(everyone=True), Caps(rate_bps=10**9, max_bytes=5000, max_flows=4))
    first, *_ = t.book(booking(max_bytes=10**9), NOW_MS, 0.0)
    assert first.meter.caps.max_bytes == 5000  # the operator's cap wins over the DC's ask
    assert first.meter.charge(b"\x45" + bytes(3999), 0.0) is None
    again, created, _ = t.book(booking(), NOW_MS, 0.0)
    assert not created and again.meter.caps.max_bytes == 5000  # the same path again: no new budget
    moved, created, _ = t.book(booking(path="02" * 8), NOW_MS, 1.0)
    assert created and moved is first and moved.meter.caps.max_bytes == 4000 + 5000
    assert t.expire(59.0) == [] and sorted(t.expire(61.0)) == [b"\x01" * 8, b"\x02" * 8] and not t.nodes


def test_a_node_booked_again_and_again_holds_a_bounded_number_of_paths():
    """Adversary: an allowed node (or its DC) booking path after path: its oldest paths are
    closed, so it never holds more than EXIT_PATHS_PER_NODE sessions at the exit."""
    t = ExitTable(ExitPolicy(everyone=True))
    closed = []
    for i in range(EXIT_PATHS_PER_NODE + 3):
        closed += t.book(booking(path=f"{i:016x}"), NOW_MS, 0.0)[2]
    assert closed == [bytes.fromhex(f"{i:016x}") for i in range(3)]
    assert len(t.by_path) == len(t.nodes[NODE].paths) == EXIT_PATHS_PER_NODE


def test_meter_caps_flows_rate_and_bytes():
    """Adversary: a booked node scanning ports (new flows), flooding (rate), or outlasting its
    booking's budget (bytes): the packet over the cap is dropped with its reason, others pass."""
    m = Meter(Caps(rate_bps=10_000, max_bytes=30_000, max_flows=2), 0.0)
    a, b, c = (tcp("100.64.0.1", f"203.0.113.{i}", b"x") for i in (1, 2, 3))
    assert m.charge(a, 0.0) is None and m.charge(b, 0.0) is None
    assert m.charge(c, 0.0) == "flow_cap" and m.charge(a, 0.0) is None  # known flows go on
    assert m.charge(c, FLOW_IDLE_S + 1) is None  # idle flows no longer count
    m = Meter(Caps(rate_bps=1000, max_bytes=10**6, max_flows=10), 0.0)
    big = a + bytes(900)
    assert m.charge(big, 0.0) is None and m.charge(big, 0.0) == "rate" and m.charge(big, 1.0) is None
    m = Meter(Caps(rate_bps=10**6, max_bytes=2000, max_flows=10), 0.0)
    assert m.charge(big, 0.0) is None and m.charge(big, 0.0, outbound=False) is None
    assert m.charge(big, 0.0) == "byte_cap" and m.used == 2 * len(big)


def test_flow_of_reads_ports_only_where_they_are():
    pkt = tcp("100.64.0.1", "203.0.113.9", b"")
    assert flow_of(pkt) == (4, 6, ipaddress.IPv4Address("203.0.113.9").packed, 40000, 22)
    frag = bytearray(pkt)
    frag[6:8] = struct.pack("!H", 5)
    assert flow_of(bytes(frag))[3:] == (0, 0)
    assert flow_of(b"") is None and flow_of(b"\x45") is None and flow_of(b"\x15" * 40) is None


def test_exit_overlay_rewrites_ipv4_sources_and_drops_spoofed_ipv6_ones():
    """Adversary: a booked node sending inner packets from another node's overlay address (to
    have the exit forward them as that node): dropped and counted. IPv4 sources cannot be chosen
    at all: the exit replaces them by the node's own address in its view."""
    ov = exit_overlay(EXIT_ID)
    ov.addresses(NODE)
    ov.addresses(OTHER)
    out = ov.inbound(NODE, tcp("100.64.0.1", "203.0.113.9", b"hi"))
    mine = out[12:16]
    assert ipaddress.IPv4Address(mine) in EXIT_V4_NET and out[16:20] == ipaddress.IPv4Address("203.0.113.9").packed
    assert ov.inbound(NODE, tcp("100.100.0.3", "203.0.113.9", b"hi"))[12:16] == mine
    reply = tcp("203.0.113.9", str(ipaddress.IPv4Address(mine)), b"ok")
    assert ov.outbound(reply) == NODE  # the server's answer goes back to the node
    server6 = ipaddress.IPv6Address("2001:db8::9").packed
    assert ov.inbound(NODE, ipv6(v6_of(NODE).packed, server6)) is not None
    assert ov.inbound(NODE, ipv6(v6_of(OTHER).packed, server6)) is None
    assert ov.inbound(NODE, ipv6(ipaddress.IPv6Address("2001:db8::66").packed, server6)) is None
    assert ov.stats["rx_spoofed_source"] == 2


def test_exit_messages_are_checked_when_decoded():
    offer = messages.RouteOffer(keys.checksum(EXIT_ID), 1, "00" * 65, [], True)
    grant = messages.ExitGrant(
        "01" * 8, ["192.0.2.1:4341", "[2001:db8::1]:4341"], keys.checksum(EXIT_ID), "02" * 33, offer, NOW_MS, 10, 10, 10
    )
    assert messages.decode(messages.ExitGrant, messages.encode(grant)) == grant
    with pytest.raises(ParseError):
        messages.decode(messages.ExitGrant, {**messages.encode(grant), "exit": []})
    with pytest.raises(ParseError):
        messages.decode(messages.ExitBooking, {**messages.encode(booking()), "max_bytes": 0})


# --- the exit's adapter on fakes: a booking, a real handshake, packets both ways -----------------
DC_KEY = keys.private_key(b"\x55" * 32)
NODE_ADDR = ("::ffff:198.51.100.7", 40000)


class FakeUdp:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, addr) -> None:
        self.sent.append((data, addr))


class FakeTun:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, pkt: bytes) -> None:
        self.written.append(pkt)


def running_exit(policy: ExitPolicy, caps: Caps = Caps()):
    trust = DcTrust()
    trust.active.add(keys.node_id_of(DC_KEY))
    now = [100.0]
    ex = RelayExit(policy, caps, ["192.0.2.1:4341"], trust, clock=Clock(lambda: now[0], lambda: NOW_MS / 1000))
    ex.udp, ex.tun = FakeUdp(), FakeTun()
    return ex, now


def signed(b: messages.ExitBooking, key=DC_KEY) -> dict:
    return envelope.seal(key, messages.EXIT_BOOKING, messages.encode(b), NOW_MS)


def test_exit_books_only_for_active_dcs_and_allowed_nodes():
    """Adversaries: a booking signed by a key that is no active DC, a replayed one, one for a
    node the operator did not allow: refused with their codes, no path opened."""
    ex, _ = running_exit(ExitPolicy.parse([keys.checksum(NODE)]))
    assert ex.book(signed(booking(), keys.private_key(b"\x66" * 32)))[1]["error"] == "untrusted_dc"
    assert ex.book(signed(booking(OTHER_KEY)))[1]["error"] == "not_allowed"
    assert ex.book({"kind": "exit-booking"})[0] == 400
    env = signed(booking())
    status, grant = ex.book(env)
    assert status == 200 and grant["exit_node"] == keys.checksum(ex.id) and grant["offer"]["exit"]
    assert ex.book(env) == (403, {"error": "replayed", "message": "envelope replayed"})
    assert list(ex.sessions) == [b"\x01" * 8] and ex.refused == {
        "untrusted_dc": 1,
        "not_allowed": 1,
        "malformed": 1,
        "replayed": 1,
    }


def test_exit_carries_a_booked_nodes_tunnel_both_ways_and_drops_what_it_must():
    """A booked node's handshake and packets through the exit: its IPv4 leaves with the exit's
    address for it, the server's answer comes back through the tunnel. Adversaries: the node's
    packet from another node's IPv6 address (dropped, counted `spoofed_source`) and a stranger's
    datagram on an unbooked path (dropped, `unknown_path`)."""
    ex, now = running_exit(ExitPolicy(everyone=True), Caps(max_flows=1))
    _, grant = ex.book(signed(booking()))
    node = Session(NODE_KEY, ex.id, ex.pub, b"\x01" * 8, role="initiate", candidates=[("192.0.2.1", 4341)])
    node.start(now[0])
    for dg, _ in node.poll(now[0]):
        ex.on_datagram(dg, NODE_ADDR)
    events = [ev for dg, addr in ex.udp.sent for ev in node.receive(dg, ("192.0.2.1", 4341), now[0])]
    assert node.established and events
    ex.udp.sent.clear()
    node.datagrams_to_send()

    ex.on_datagram(node.encrypt(tcp("100.64.0.1", "203.0.113.9", b"hi"), now[0]), NODE_ADDR)
    [out] = ex.tun.written
    inner = out[12:16]
    assert ipaddress.IPv4Address(inner) in EXIT_V4_NET and out[16:20] == ipaddress.IPv4Address("203.0.113.9").packed
    ex.from_tun(tcp("203.0.113.9", str(ipaddress.IPv4Address(inner)), b"ok"))
    [(dg, addr)] = ex.udp.sent
    assert addr == NODE_ADDR
    [answer] = [ev for ev in node.receive(dg, ("192.0.2.1", 4341), now[0]) if isinstance(ev, Data)]
    assert answer.payload[12:16] == ipaddress.IPv4Address("203.0.113.9").packed

    ex.on_datagram(
        node.encrypt(ipv6(v6_of(OTHER).packed, ipaddress.IPv6Address("2001:db8::9").packed), now[0]), NODE_ADDR
    )
    ex.on_datagram(node.encrypt(tcp("100.64.0.1", "203.0.113.10", b"2nd flow"), now[0]), NODE_ADDR)
    ex.on_datagram(b"\x03" + b"\x09" * 8 + bytes(40), ("::ffff:192.0.2.99", 1))
    st = ex.status()["dropped"]
    assert len(ex.tun.written) == 1 and st["spoofed_source"] == 1 and st["flow_cap"] == 1 and st["unknown_path"] == 1


# --- the DC's booking and the node's check of the grant, on fakes --------------------------------
class FakeFederation:
    """Relays as the DC's federation client sees them: each answers a grant or refuses."""

    def __init__(self, answers: list) -> None:
        self.answers, self.asked = answers, []

    async def book_exit(self, url: str, booking: messages.ExitBooking) -> messages.ExitGrant:
        self.asked.append((url, booking))
        a = self.answers[min(len(self.asked), len(self.answers)) - 1]  # the last one from then on
        if isinstance(a, Exception):
            raise a
        return a


def fake_dc(online: set[bytes], answers: list) -> SimpleNamespace:
    return SimpleNamespace(
        clock=Clock(wall=lambda: NOW_MS / 1000),
        guard=envelope.ReplayGuard(),
        presence=SimpleNamespace(online=lambda n: n in online),
        relays=["http://rs1:8340", "http://rs2:8340"],
        federation=FakeFederation(answers),
    )


def a_grant(ex_key=keys.private_key(b"\x33" * 32), offer_key=None, exit_flag=True) -> messages.ExitGrant:
    offer = sign_offer(offer_key or ex_key, [], exit_flag, NOW_MS)
    return messages.ExitGrant(
        "01" * 8,
        ["192.0.2.1:4341"],
        keys.checksum(keys.node_id_of(ex_key)),
        keys.public_bytes(ex_key).hex(),
        offer,
        NOW_MS + 1000,
        10,
        10,
        10,
    )


def test_dc_books_for_its_live_signed_nodes_and_passes_the_relays_refusal_on():
    """Adversaries: a node without a session at this DC, a replayed request, a node asking
    again and again (each booking costs the DC a request to a relay); and a relay that refuses
    the node (its code and status reach the node). The DC asks the next relay when one is down,
    and books with the key the node signed with."""
    dc = fake_dc({NODE}, [FederationError("relay http://rs1:8340 unreachable"), a_grant()])
    booker = ExitBooker(dc)

    def ask(key=NODE_KEY, b: ExitBooker = booker):
        return asyncio.run(b.book(envelope.seal(key, messages.EXIT_REQUEST, {}, NOW_MS)))

    req = envelope.seal(NODE_KEY, messages.EXIT_REQUEST, {}, NOW_MS)
    assert asyncio.run(booker.book(req)) == a_grant()
    url, sent = dc.federation.asked[1]
    assert url == "http://rs2:8340" and sent.node == keys.checksum(NODE)
    assert keys.node_id(bytes.fromhex(sent.node_pubkey)) == NODE
    with pytest.raises(SignatureError):
        asyncio.run(booker.book(req))  # replayed
    with pytest.raises(ExitError) as e:
        ask(OTHER_KEY)
    assert e.value.refusal()[::-1] == ("no_session", 403)
    for _ in range(EXIT_BOOKINGS_BURST - 1):
        ask()
    asked = len(dc.federation.asked)
    with pytest.raises(ExitError) as e:
        ask()
    assert e.value.refusal()[::-1] == ("rate_limited", 429) and len(dc.federation.asked) == asked
    refusing = fake_dc(
        {NODE}, [FederationError("relay http://rs1:8340 refused: not on its --exit-allow list", "not_allowed", 403)]
    )
    with pytest.raises(ExitError) as e:
        ask(b=ExitBooker(refusing))
    assert e.value.refusal()[::-1] == ("not_allowed", 403) and "--exit-allow" in str(e.value)


@pytest.mark.parametrize(
    "grant, why",
    [
        (a_grant(offer_key=keys.private_key(b"\x44" * 32)), "do not match"),  # offer signed by another key
        (a_grant(exit_flag=False), "do not match"),  # an offer without the exit
        (
            messages.ExitGrant(
                **{
                    **messages.encode(a_grant()),
                    "exit_pubkey": keys.public_bytes(OTHER_KEY).hex(),
                    "offer": a_grant().offer,
                }
            ),
            "do not match",
        ),  # the key is not the exit's node ID
    ],
)
def test_node_refuses_a_grant_that_does_not_verify(grant, why):
    """Adversary: a DC (or whoever answers for it) handing the node an exit whose key, node ID and
    signed exit offer do not belong together: refused before any packet is sent."""

    async def book():
        return grant

    opened = []
    node = SimpleNamespace(endpoint=SimpleNamespace(open=lambda *a, **k: opened.append(a)))
    relay = ExitRelay(node, None, RouteSync(RouteTable(), None, None), book)
    with pytest.raises(ExitRelayError) as e:
        asyncio.run(relay.start())
    assert e.value.code == "bad_grant" and why in str(e.value) and not opened

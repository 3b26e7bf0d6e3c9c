"""Standby paths over a second uplink (node/uplinks.py, docs/PROTOCOL.md §8.3): the pure
decisions, driven by a FakeClock; the lab test (tests/lab/test_lab_mbb.py) runs them for real."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from node.uplinks import (
    ECHO_MIN_GAP_S,
    EXPIRE_ROUNDS,
    FLAG_ECHO,
    MAX_ADDRS,
    UNVERIFIED_TRIES,
    PrimaryChanged,
    ProbeDc,
    SendStandby,
    Standby,
    Uplink,
    encode_payload,
    parse_payload,
)
from node.standby import default_routes
from ntm.errors import ParseError
from tests.fakes import FakeClock

INTERVAL = 2.0
WIFI, CELL = Uplink("eth0", 2, 100), Uplink("eth1", 3, 200)
PATH = b"p" * 8
PEER = "198.18.0.103:4330"  # the peer's address on the tunnel
MINE = "198.18.0.102:4330"  # our second uplink's mapping, as the DC saw it
THEIRS = "203.0.113.9:4330"  # the peer's standby mapping


def test_payload_roundtrip_and_malformed():
    p = encode_payload(FLAG_ECHO, [MINE, "[2001:db8::7]:9"], [PEER])
    assert parse_payload(p) == (FLAG_ECHO, [MINE, "[2001:db8::7]:9"], [PEER])
    assert parse_payload(encode_payload(0, [], [])) == (0, [], [])
    for bad in (
        b"",
        p[:-1],
        p + b"x",
        bytes([0, MAX_ADDRS + 1]) + p[2:],
        bytes([0, 1, 5, 0, 1]) + bytes(4) + b"\0",
        bytes([0, 1, 4, 0, 0]) + bytes(4) + b"\0",
    ):  # truncated, trailing, too many, family 5, port 0
        with pytest.raises(ParseError):
            parse_payload(bad)


@given(st.binary(max_size=120))
def test_payload_parser_raises_only_parse_error(data):
    try:
        parse_payload(data)
    except ParseError:
        pass


def node_with_standby_uplink(clock: FakeClock) -> Standby:
    """Wi-Fi is primary, cellular is standby and the DC told us its mapping; one direct tunnel."""
    s = Standby(INTERVAL)
    assert s.set_uplinks([CELL, WIFI]) == []  # the first view of the uplinks is no change
    assert s.primary == WIFI
    assert s.tick(clock.now()) == [ProbeDc(CELL.ifindex)]
    s.on_probe_reply(CELL.ifindex, MINE, clock.now())
    s.set_tunnels({PATH: PEER})
    return s


def test_rounds_go_out_of_the_standby_uplink_and_announce_on_the_path():
    clock = FakeClock()
    s = node_with_standby_uplink(clock)
    out = s.tick(clock.now())
    payload = encode_payload(0, [MINE], [])
    assert out == [SendStandby(PATH, PEER, CELL.ifindex, payload), SendStandby(PATH, PEER, None, payload)]
    clock.advance(INTERVAL / 2)
    assert s.tick(clock.now()) == []  # keepalive rate, not a storm
    clock.advance(INTERVAL / 2)
    assert [a for a in s.tick(clock.now()) if isinstance(a, SendStandby)] == out
    assert s.status(PATH, clock.now())["ready"] is False
    # the peer says it hears our mapping: the standby path is ready
    s.on_standby(PATH, PEER, encode_payload(0, [], [MINE]), clock.now())
    assert s.status(PATH, clock.now()) == {
        "uplinks": [{"uplink": "eth1", "mapping": MINE, "heard": True}],
        "ready": True,
        "peer_standby": [],
    }


def test_losing_the_primary_is_reported_at_once_and_rounds_stop():
    clock = FakeClock()
    s = node_with_standby_uplink(clock)
    assert s.set_uplinks([CELL]) == [PrimaryChanged("eth0", "eth1")]
    assert s.tick(clock.now()) == []  # no standby uplink left: nothing to keep warm
    assert s.set_uplinks([CELL]) == []
    # eth1 replaced in one go (a move): a moment without uplinks is not reported, the new one is
    assert s.set_uplinks([]) == []
    assert s.set_uplinks([Uplink("eth1", 9, 0)]) == [PrimaryChanged("eth1", "eth1")]
    s = Standby(INTERVAL)
    assert s.set_uplinks([]) == []  # started without a network
    assert s.set_uplinks([WIFI]) == [PrimaryChanged(None, "eth0")]


def test_echo_rounds_are_rate_limited():
    """A peer probing our mapping asks for an echo round (our standby path is ready in one RTT);
    a peer asking for one in every packet gets one per ECHO_MIN_GAP_S."""
    clock = FakeClock()
    s = node_with_standby_uplink(clock)
    s.tick(clock.now())
    echo = encode_payload(FLAG_ECHO, [], [])
    assert len(s.on_standby(PATH, PEER, echo, clock.now())) == 2
    clock.advance(ECHO_MIN_GAP_S / 2)
    assert s.on_standby(PATH, PEER, echo, clock.now()) == []
    clock.advance(ECHO_MIN_GAP_S / 2)
    assert len(s.on_standby(PATH, PEER, echo, clock.now())) == 2
    assert Standby(INTERVAL).on_standby(PATH, PEER, echo, clock.now()) == []  # unknown tunnel


def test_peer_side_keeps_a_heard_address_warm_and_drops_it_when_silent():
    clock = FakeClock()
    s = Standby(INTERVAL)  # a peer with one uplink
    s.set_uplinks([WIFI])
    s.set_tunnels({PATH: PEER})
    assert s.on_standby(PATH, PEER, encode_payload(0, [THEIRS], []), clock.now()) == []
    first = s.tick(clock.now())
    assert first == [SendStandby(PATH, THEIRS, None, encode_payload(FLAG_ECHO, [], []))]
    clock.advance(0.1)
    # the node's STANDBY out of its second uplink arrives from that address: heard, told at once
    s.on_standby(PATH, THEIRS, encode_payload(0, [THEIRS], []), clock.now())
    assert s.tick(clock.now()) == [SendStandby(PATH, THEIRS, None, encode_payload(0, [], [THEIRS]))]
    assert s.status(PATH, clock.now())["peer_standby"] == [THEIRS]
    sent = 0
    for _ in range(10 * EXPIRE_ROUNDS):
        clock.advance(INTERVAL / 4)
        sent += len(s.tick(clock.now()))
    assert 0 < sent <= EXPIRE_ROUNDS + 1  # one per interval until it went silent, then none
    assert s.status(PATH, clock.now())["peer_standby"] == []


def test_a_lying_peer_gets_a_few_packets_sent_to_strangers_ever():
    """Hostile peer: it announces addresses that are not its own (a victim's), again and again,
    and more than MAX_ADDRS of them. Each gets UNVERIFIED_TRIES STANDBYs in all; at most MAX_ADDRS
    are taken; our own current peer address is never a standby one."""
    clock = FakeClock()
    s = Standby(INTERVAL)
    s.set_tunnels({PATH: PEER})
    victims = [f"192.0.2.{i}:53" for i in range(1, 10)]
    sent: list[str] = []
    for i in range(50):
        s.on_standby(PATH, PEER, encode_payload(0, [PEER, *victims[i % 3 * 3 :][:MAX_ADDRS]], []), clock.now())
        sent += [a.to for a in s.tick(clock.now()) if isinstance(a, SendStandby)]
        clock.advance(INTERVAL)
    assert PEER not in sent
    assert len(set(sent)) <= MAX_ADDRS
    assert all(sent.count(v) == UNVERIFIED_TRIES for v in set(sent))


def test_a_tunnel_that_ends_or_moves_forgets_its_standby_state():
    clock = FakeClock()
    s = node_with_standby_uplink(clock)
    s.on_standby(PATH, THEIRS, encode_payload(0, [], []), clock.now())
    assert s.status(PATH, clock.now())["peer_standby"] == [THEIRS]
    s.set_tunnels({PATH: THEIRS})  # the peer roamed to its standby address: now the current one
    assert s.status(PATH, clock.now())["peer_standby"] == []
    s.set_tunnels({})
    assert s.status(PATH, clock.now()) == {}


def test_default_routes_from_the_kernel_tables(tmp_path):
    """/proc/net/route and /proc/net/ipv6_route: default routes only, the lowest metric per
    interface, IPv6's "unreachable" default routes ignored; a missing table is no uplinks. (The
    interface is "lo" here because the name must exist in the test's namespace.)"""
    r4 = tmp_path / "route"
    r4.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "lo\t00000000\t0100020A\t0003\t0\t0\t200\t00000000\t0\t0\t0\n"
        "lo\t00000000\t0100010A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "lo\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    )
    r6 = tmp_path / "ipv6_route"
    zero = "0" * 32
    r6.write_text(
        f"{zero} 00 {zero} 00 {zero} 00000400 00000001 00000000 00000003 lo\n"
        f"{zero} 00 {zero} 00 {zero} ffffffff 00000001 00000000 00200200 lo\n"
        f"fe80{zero[4:]} 40 {zero} 00 {zero} 00000100 00000001 00000000 00000001 lo\n"
    )
    assert default_routes(4, r4, r6) == [Uplink("lo", 1, 0)]
    assert default_routes(6, r4, r6) == [Uplink("lo", 1, 0x400)]
    assert default_routes(4, tmp_path / "none", r6) == []

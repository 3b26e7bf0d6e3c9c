"""RelayTable, sans-I/O: binds, forwarding both ways, every drop reason, caps and expiry; the
trust cache with an injected clock; random bytes never make on_datagram raise."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntm import packet
from rs.relay import MAX_LIFETIME_S, RELAY_IDLE_S, UNBOUND_S, PathError, RelayTable
from ntm.addr import display, for_socket
from rs.trust import DcTrust
from tests.fakes import FakeChain, FakeRegistry

PATH = bytes.fromhex("0102030405060708")
TOKEN = bytes(range(32))
A = ("192.0.2.1", 4330)
B = ("2001:db8::2", 4330)
A2 = ("198.51.100.7", 50000)  # A after a move
EVIL = ("203.0.113.66", 4330)
T0 = 1000.0


_counters = itertools.count(1)


def bind(
    side: int, token: bytes = TOKEN, path: bytes = PATH, cookie: bytes = packet.NO_COOKIE, counter: int | None = None
) -> bytes:
    """A RELAY_BIND for `side`, MAC'd with that side's key of `token`, with a fresh counter."""
    return packet.RelayBind.make(
        path, side, counter or next(_counters), cookie, packet.relay_side_key(token, side)
    ).encode()


def bind_at(t: RelayTable, side: int, addr, now: float, token: bytes = TOKEN) -> list:
    """A node's two-step bind from `addr`: a bind that gets the address's cookie, then one that
    carries it. Returns the relay's answer to the second (or to the first if that bound)."""
    out = t.on_datagram(bind(side, token), addr, now)
    if not out or packet.RelayBindAck.parse(out[0][0]).bound:
        return out
    return t.on_datagram(bind(side, token, cookie=packet.RelayBindAck.parse(out[0][0]).cookie), addr, now)


def acked(out: list, side: int, addr, bound: bool = True) -> bool:
    """`out` is exactly one RELAY_BIND_ACK for `side`, sent to `addr`, with `bound`."""
    if len(out) != 1 or out[0][1] != addr:
        return False
    a = packet.RelayBindAck.parse(out[0][0])
    return a.side == side and a.bound == bound


def data(payload: bytes = b"x" * 40, path: bytes = PATH, counter: int = 0) -> bytes:
    return packet.TransportPacket(packet.TYPE_DATA, path, counter, payload + b"\0" * 16).encode()


def table_with_path(max_bytes: int = 10**6, lifetime: float = 600.0, secret: bytes = b"", **kw) -> RelayTable:
    """A table with PATH booked; `secret` fixes its cookie key (twins that must agree)."""
    t = RelayTable(**kw)
    t.secret = secret or t.secret
    t.add_path(PATH, TOKEN, T0 + lifetime, max_bytes, T0)
    return t


def bound_table(**kw) -> RelayTable:
    t = table_with_path(**kw)
    assert acked(bind_at(t, 0, A, T0), 0, A)
    assert acked(bind_at(t, 1, B, T0), 1, B)
    return t


def test_bind_and_forward_both_ways():
    t = bound_table()
    p1, p2 = data(b"a" * 50), data(b"b" * 70, counter=1)
    assert t.on_datagram(p1, A, T0 + 1) == [(p1, B)]
    assert t.on_datagram(p2, B, T0 + 1) == [(p2, A)]
    for kind in packet.FORWARDED_TYPES:
        pkt = bytes([kind]) + PATH + os.urandom(30)
        assert t.on_datagram(pkt, B, T0 + 2) == [(pkt, A)]  # prefix only: bodies are never parsed
    path = t.paths[PATH]
    assert path.bytes[0] == len(p1) and path.packets[0] == 1
    assert path.packets[1] == 1 + len(packet.FORWARDED_TYPES)
    assert t.forwarded_packets == 2 + len(packet.FORWARDED_TYPES)
    assert [e.kind for e in t.pop_events()] == ["added", "bound", "bound"]
    assert "token" not in path.stats() and path.stats()["bound"] == [True, True]


def test_forwarded_datagram_is_unchanged_object():
    t = bound_table()
    p = data(b"secret")
    [(out, dest)] = t.on_datagram(p, A, T0)
    assert out is p and dest == B


def test_wrong_token_changes_nothing():
    t = table_with_path()
    bind_at(t, 0, A, T0)
    bad = bytes(32)
    assert t.on_datagram(bind(0, bad), EVIL, T0) == []  # cannot hijack side 0
    assert t.on_datagram(bind(1, bad), EVIL, T0) == []  # cannot take side 1
    assert t.dropped["bad_token"] == 2
    assert t.paths[PATH].addrs == [A, None]
    assert t.paths[PATH].binds == 1


def test_one_side_cannot_bind_as_the_other():
    """Issue 11 item 4: each node holds only its own side's key."""
    t = table_with_path()
    side0_key = packet.relay_side_key(TOKEN, 0)
    forged = packet.RelayBind.make(PATH, 1, next(_counters), packet.NO_COOKIE, side0_key).encode()
    assert t.on_datagram(forged, EVIL, T0) == [] and t.dropped["bad_token"] == 1
    assert packet.relay_side_key(TOKEN, 0) != packet.relay_side_key(TOKEN, 1)


def test_a_replayed_bind_is_refused():
    """Issue 11 item 4: a bind captured on the wire and replayed (from anywhere) is refused, so it
    can neither move the side nor make the relay answer."""
    t = table_with_path()
    first = bind(0)
    out = t.on_datagram(first, A, T0)
    cookie = packet.RelayBindAck.parse(out[0][0]).cookie
    second = bind(0, cookie=cookie)
    assert acked(t.on_datagram(second, A, T0), 0, A)
    assert t.on_datagram(second, A2, T0 + 1) == [] and t.on_datagram(first, EVIL, T0 + 1) == []
    assert t.dropped["replay"] == 2 and t.paths[PATH].addrs == [A, None]


def test_a_spoofed_source_is_never_bound_nor_sent_traffic():
    """Issue 11 item 4 (return routability): a bind naming a victim's address as its source gets
    one small ack sent there, and is not bound; the other side's traffic never goes there. A bind
    only binds when it carries the cookie the relay sent to that very address."""
    t = bound_table()
    victim = ("198.51.100.99", 9)
    out = t.on_datagram(bind(0), victim, T0 + 1)  # a fresh bind with the key, spoofed source
    assert acked(out, 0, victim, bound=False) and len(out[0][0]) < len(bind(0))
    wrong_cookie = bind(0, cookie=packet.RelayBindAck.parse(t.on_datagram(bind(0), A2, T0 + 1)[0][0]).cookie)
    assert acked(t.on_datagram(wrong_cookie, victim, T0 + 2), 0, victim, bound=False)  # A2's cookie, not its own
    assert t.paths[PATH].addrs == [A, B]
    p = data()
    assert t.on_datagram(p, B, T0 + 3) == [(p, A)]


def test_unbound_sender_and_peer_unbound():
    t = table_with_path()
    assert t.on_datagram(data(), A, T0) == []
    assert t.dropped["unknown_sender"] == 1
    bind_at(t, 0, A, T0)
    assert t.on_datagram(data(), A, T0) == []
    assert t.dropped["peer_unbound"] == 1


def test_spoofed_source_address_dropped():
    t = bound_table()
    assert t.on_datagram(data(), EVIL, T0) == []
    assert t.on_datagram(data(), (A[0], A[1] + 1), T0) == []  # right IP, wrong port
    assert t.dropped["unknown_sender"] == 2
    assert t.forwarded_packets == 0


def test_rebind_moves_side():
    t = bound_table()
    t.pop_events()
    assert acked(t.on_datagram(bind(0), A2, T0 + 5), 0, A2, bound=False)  # not before it proves A2
    assert t.paths[PATH].addrs == [A, B]
    assert acked(bind_at(t, 0, A2, T0 + 5), 0, A2)
    assert t.paths[PATH].addrs == [A2, B]
    p = data()
    assert t.on_datagram(p, B, T0 + 6) == [(p, A2)]  # goes to the new address
    assert t.on_datagram(p, A, T0 + 6) == []  # the old address is no longer side 0
    assert t.on_datagram(p, A2, T0 + 6) == [(p, B)]
    assert [(e.kind, e.side) for e in t.pop_events()] == [("moved", 0)]
    # a repeated bind from the same address is acked but is not an event
    assert acked(t.on_datagram(bind(0), A2, T0 + 7), 0, A2)
    assert t.pop_events() == []


def test_bind_from_other_sides_address_refused():
    t = bound_table()
    assert t.on_datagram(bind(1), A, T0) == []
    assert t.dropped["same_address"] == 1
    assert t.paths[PATH].addrs == [A, B]


def test_malformed_unknown_and_unexpected():
    t = bound_table()
    assert t.on_datagram(b"", A, T0) == []
    assert t.on_datagram(b"\x03" + PATH[:4], A, T0) == []
    assert t.on_datagram(b"\x7f" + PATH + b"zz", A, T0) == []
    assert t.dropped["malformed"] == 3
    assert t.on_datagram(data(path=bytes(8)), A, T0) == []
    assert t.dropped["unknown_path"] == 1
    ack = packet.RelayBindAck(PATH, 0, True, 1, packet.NO_COOKIE).encode()
    assert t.on_datagram(ack, A, T0) == []
    assert t.dropped["unexpected_type"] == 1
    assert t.on_datagram(bind(0)[:-1], A, T0) == []
    b = bytearray(bind(0))
    b[packet.PREFIX_LEN] = 2
    assert t.on_datagram(bytes(b), A, T0) == []
    assert t.dropped["bad_bind"] == 2
    assert t.forwarded_packets == 0


def test_byte_cap_removes_path():
    p = data(b"z" * 100)
    t = bound_table(max_bytes=3 * len(p) + 10)
    for _ in range(3):
        assert t.on_datagram(p, A, T0) == [(p, B)]
    assert t.on_datagram(p, B, T0) == []  # the 4th would exceed the budget (both directions count)
    assert t.dropped["byte_cap"] == 1 and t.removed["byte_cap"] == 1
    assert PATH not in t.paths
    assert t.on_datagram(p, A, T0) == []
    assert t.dropped["unknown_path"] == 1


def test_lifetime():
    t = bound_table(lifetime=60.0)
    p = data()
    # keep it busy so it is never idle: it still dies at its lifetime
    for s in range(0, 60, 10):
        assert t.on_datagram(p, A, T0 + s) == [(p, B)]
    assert t.on_datagram(p, A, T0 + 60) == []
    assert t.dropped["expired"] == 1 and t.removed["lifetime"] == 1 and PATH not in t.paths


def test_lifetime_capped_by_relay_policy():
    t = RelayTable()
    path, _ = t.add_path(PATH, TOKEN, T0 + 10 * MAX_LIFETIME_S, 10, T0)
    assert path.expires_at == T0 + MAX_LIFETIME_S


def test_idle_expiry_and_keepalive_keeps_alive():
    assert RELAY_IDLE_S > 2 * 25  # must outlast the tunnel keepalive interval with margin
    t = bound_table(lifetime=3600.0)
    ka = packet.TransportPacket(packet.TYPE_KEEPALIVE, PATH, 1, bytes(16)).encode()
    now = T0
    for _ in range(10):  # keepalives every 25 s keep the path for 250 s, far past RELAY_IDLE_S
        now += 25
        assert t.on_datagram(ka, A, now) == [(ka, B)]
        assert t.expire(now) == 0
    assert t.expire(now + RELAY_IDLE_S - 0.1) == 0
    assert t.expire(now + RELAY_IDLE_S) == 1
    assert t.removed["idle"] == 1 and PATH not in t.paths


def test_wrong_token_binds_do_not_keep_path_alive():
    t = table_with_path(lifetime=3600.0)
    for s in range(0, int(UNBOUND_S), 10):
        assert t.on_datagram(bind(0, bytes(32)), EVIL, T0 + s) == []
    assert t.paths[PATH].last_active == T0
    assert t.expire(T0 + UNBOUND_S) == 1


def test_a_path_nobody_binds_is_released_early():
    """Issue 11 item 5: every direction books a fallback path; one no node binds is gone after
    UNBOUND_S (not RELAY_IDLE_S), so a flood of directions cannot pile paths up at the relay."""
    assert UNBOUND_S < RELAY_IDLE_S
    t = RelayTable()
    for i in range(100):
        t.add_path(bytes([i]) * 8, TOKEN, T0 + 3600, 1000, T0)
    t.add_path(PATH, TOKEN, T0 + 3600, 1000, T0)
    assert acked(bind_at(t, 0, A, T0 + 1), 0, A)  # this one is in use
    assert t.expire(T0 + UNBOUND_S - 0.1) == 0
    assert t.expire(T0 + UNBOUND_S) == 100 and list(t.paths) == [PATH]
    assert t.removed["unbound"] == 100


def test_add_path_idempotent_conflict_and_extend():
    t = RelayTable()
    owner = b"\x11" * 20
    p, created = t.add_path(PATH, TOKEN, T0 + 60, 1000, T0, owner=owner)
    assert created
    p2, created = t.add_path(PATH, TOKEN, T0 + 120, 500, T0 + 1, owner=owner)
    assert p2 is p and not created and p.expires_at == T0 + 120 and p.max_bytes == 1000
    with pytest.raises(PathError) as e:
        t.add_path(PATH, bytes(32), T0 + 60, 1000, T0, owner=owner)
    assert e.value.code == "conflict"
    with pytest.raises(PathError) as e:
        t.add_path(PATH, TOKEN, T0 + 60, 1000, T0, owner=b"\x22" * 20)  # another DC
    assert e.value.code == "conflict"
    with pytest.raises(ValueError):
        t.add_path(PATH, TOKEN, T0 - 1, 1000, T0)
    with pytest.raises(ValueError):
        t.add_path(PATH[:4], TOKEN, T0 + 1, 1000, T0)
    # an expired path's ID can be reused with a new token
    _, created = t.add_path(PATH, bytes(32), T0 + 500, 1000, T0 + 200, owner=owner)
    assert created and t.removed["expired"] == 1


def test_table_bound():
    t = RelayTable(max_paths=3)
    for i in range(3):
        t.add_path(bytes([i]) * 8, TOKEN, T0 + 10 + i, 100, T0)
    with pytest.raises(PathError) as e:
        t.add_path(b"\x09" * 8, TOKEN, T0 + 60, 100, T0)
    assert e.value.code == "full" and len(t.paths) == 3
    # once one has expired there is room again (the sweep runs on demand)
    t.add_path(b"\x09" * 8, TOKEN, T0 + 200, 100, T0 + 10.5)
    assert len(t.paths) == 3 and b"\x00" * 8 not in t.paths


def test_address_normalisation():
    v6 = socket.AF_INET6
    assert for_socket(("::ffff:127.0.0.1", 5, 0, 0), v6) == for_socket(("::FFFF:7f00:1", 5, 7, 0), v6)
    assert for_socket(("::1", 5, 3, 0), v6) == for_socket(("0:0::1", 5, 0, 0), v6)
    assert for_socket(("fe80::1", 5, 0, 2), v6) == ("fe80::1", 5, 0, 2)
    assert for_socket(("127.0.0.1", 5), socket.AF_INET) == ("127.0.0.1", 5)
    assert display(for_socket(("::ffff:10.0.0.1", 9, 0, 0), v6)) == "10.0.0.1:9"
    assert display(("::1", 9)) == "[::1]:9"


async def test_trust_follows_the_chains_dc_events_without_asking_per_request():
    chain = FakeChain()
    dc, other = b"\x01" * 20, b"\x02" * 20
    chain.admit(dc, "dc1", "http://dc1")
    registry = FakeRegistry(chain, dc)
    trust = DcTrust()
    await trust.load(registry)
    follower = asyncio.create_task(trust.follow(registry, 0))
    try:
        assert trust.is_active(dc) and not trust.is_active(other)
        chain.admit(other, "dc2", "http://dc2")
        chain.remove(dc)
        await asyncio.sleep(0)
        for _ in range(10):
            if trust.block == chain.block:
                break
            await asyncio.sleep(0.01)
        assert trust.is_active(other) and not trust.is_active(dc)
        assert [trust.is_active(bytes([i]) * 20) for i in range(3, 103)] == [False] * 100
        assert chain.lookups == 0  # no chain read, however many signers are checked
    finally:
        follower.cancel()


kinds = st.sampled_from(sorted(packet.KNOWN_TYPES | {0x00, 0x12, 0xFF}))
addrs = st.sampled_from([A, B, A2, EVIL])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(kinds, st.booleans(), st.binary(max_size=80), addrs, st.floats(0, 200)), max_size=40))
def test_random_datagrams_never_raise(events):
    t = bound_table(max_bytes=2000, lifetime=150.0)
    for kind, known_path, tail, addr, dt in events:
        dgram = bytes([kind]) + (PATH if known_path else tail[:8]) + tail
        out = t.on_datagram(dgram, addr, T0 + dt)
        assert isinstance(out, list)
        for payload, dest in out:
            assert payload is dgram or payload[0] == packet.TYPE_RELAY_BIND_ACK
        t.expire(T0 + dt)
    for raw in (b"", b"\x10", os.urandom(9)):
        t.on_datagram(raw, A, T0)
    path = t.paths.get(PATH)
    if path is not None:
        assert path.total_bytes <= path.max_bytes

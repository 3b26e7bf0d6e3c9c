"""Tunnel Session edges: exact boundaries of key lifetimes and counters, the replay window on the
fast receive path under reordering, counters that must count every occurrence, and where
Requests go. Complements test_tunnel.py (behaviour) and test_tunnel_trace.py (golden trace)."""

from __future__ import annotations

import os

import pytest

from ntm import keys
from ntm.packet import (
    HEADER,
    MAX_PAYLOAD,
    MIN_TRANSPORT_LEN,
    TYPE_CLOSE,
    TYPE_DATA,
    TYPE_HANDSHAKE_REQUEST,
    TYPE_KEEPALIVE,
    RelayBindAck,
)
from ntm.tunnel import NONCE_PREFIX, RelayInfo, ReplayWindow, Session, TunnelConfig, TunnelError
from tests.test_tunnel import ADDR_A, ADDR_A2, ADDR_B, IDA, IDB, KA, KB, PA, PATH, PB, T0, connect, data_of, rekeyed

RELAY = ("192.0.2.1", 4340)


def test_reordered_packets_on_the_fast_path_are_accepted_once():
    a, b, _ = connect()
    pkts = [a.encrypt(b"p%d" % i, T0) for i in range(8)]
    for i in (5, 3, 0, 7, 1):
        assert data_of(b.receive(pkts[i], ADDR_A, T0)) == [b"p%d" % i]
    for i in (5, 3, 0, 7, 1):
        assert b.receive(pkts[i], ADDR_A, T0) == []  # each a replay now
    for i in (2, 4, 6):  # the gaps are still open
        assert data_of(b.receive(pkts[i], ADDR_A, T0)) == [b"p%d" % i]
    assert b.stats["drop_replay"] == 5


def test_key_lifetimes_end_exactly_at_their_deadline():
    a, b, _ = connect()
    end = b.current.reject_time
    assert end == b.current.created + a.config.reject_after_time
    fast, slow = a.encrypt(b"x", T0), a.encrypt(b"y", T0)
    assert b.receive(fast, ADDR_A, end) == []  # fast path, at the deadline
    assert b.receive(slow, ADDR_A2, end) == []  # slow path, at the deadline
    with pytest.raises(TunnelError, match="^tunnel keys exhausted; waiting for a rekey$"):
        a.close_packet(a.current.reject_time) or a._seal(TYPE_KEEPALIVE, b"", a.current.reject_time)


def test_previous_keys_end_exactly_at_the_grace_deadline():
    _, b, _, [held] = rekeyed(TunnelConfig(rekey_after_time=10.0, previous_key_grace=2.0), held=1)
    assert b.receive(held, ADDR_A, b.previous.expires) == []
    assert b.stats["drop_expired_key"] == 1


def test_an_old_packet_with_a_counter_the_new_keys_already_used_still_decrypts():
    """The new keys' window saying "seen" for a counter must not stop the previous keys from
    being tried: their counters are independent."""
    a, b, _, held = rekeyed(TunnelConfig(rekey_after_time=10.0, previous_key_grace=5.0), held=3)
    t = T0 + 10.5
    for i in range(5):
        b.receive(a.encrypt(b"new%d" % i, t), ADDR_A, t)
    assert [data_of(b.receive(p, ADDR_A, t + 1)) for p in held] == [[b"old0"], [b"old1"], [b"old2"]]


def test_a_rekey_starts_on_exactly_the_packet_that_reaches_the_count():
    cfg = TunnelConfig(rekey_after_messages=20)
    a, b, _ = connect(cfg)
    sent_before, requests = a.current.counter, a.stats["requests_sent"]  # the handshake used some
    for _ in range(20 - 1 - sent_before):
        a.encrypt(b"x", T0)
    assert not a.has_output and a.stats["requests_sent"] == requests
    a.encrypt(b"x", T0)  # counter 19: the 20th packet on these keys
    assert [d[0] for d, _ in a.datagrams_to_send()] == [TYPE_HANDSHAKE_REQUEST]


def test_the_largest_payload_fits_and_one_more_byte_does_not():
    a, b, _ = connect()
    big = b"\x00" * MAX_PAYLOAD
    assert data_of(b.receive(a.encrypt(big, T0), ADDR_A, T0)) == [big]
    a.current.rekey_time = T0  # force the slow send path
    assert data_of(b.receive(a.encrypt(big, T0 + 1), ADDR_A, T0 + 1)) == [big]
    with pytest.raises(TunnelError, match=f"^payload of {MAX_PAYLOAD + 1} bytes does not fit one datagram$"):
        a.encrypt(big + b"\x00", T0)


def test_every_drop_is_counted_each_time():
    a, b, _ = connect()
    good = a.encrypt(b"g", T0)
    b.receive(good, ADDR_A, T0)
    req = Session(KA, IDB, PB, PATH, candidates=[ADDR_B])
    req.start(T0)
    request = req.poll(T0)[0][0]
    other = os.urandom(8)
    cases = {
        "drop_unknown_type": b"\x7f" + PATH + b"\x00" * 40,
        "drop_too_old": good[:9] + (2**64 - 1).to_bytes(8) + good[17:],
        "drop_unknown_path": bytes([TYPE_HANDSHAKE_REQUEST]) + other + request[9:],
        "drop_handshake_mac": request[:-1] + bytes([request[-1] ^ 1]),
        "relay_acks": None,
    }
    for stat, data in cases.items():
        if data is None:
            continue
        for _ in range(2):
            b.receive(data, ADDR_A, T0 + 1)
        assert b.stats[stat] == 2, stat
    fresh = Session(KB, IDA, PA, PATH, role="wait")
    fresh.start(T0)
    for _ in range(2):
        fresh.receive(good, ADDR_A, T0)
    assert fresh.stats["drop_no_keys"] == 2
    relay = Session(KA, IDB, PB, PATH, relay=RelayInfo(RELAY, os.urandom(32), 0), wall=lambda: 1.0)
    relay.start(T0)
    relay.poll(T0)  # binds at once (no candidates): counter 1,000,000
    for _ in range(2):
        relay.receive(RelayBindAck(PATH, 0, True, 1_000_000, bytes(16)).encode(), RELAY, T0)
    assert relay.stats["relay_acks"] == 2


def test_a_datagram_of_just_type_and_path_is_read_not_truncated():
    """The shortest datagram a demultiplexer can read (type and path ID, 9 bytes) is read as
    one: an unknown type is counted as such, only a shorter one as truncated."""
    a = Session(KA, IDB, PB, PATH)
    a.start(T0)
    assert a.receive(b"\xee" + PATH, ADDR_B, T0) == [] and a.stats["drop_unknown_type"] == 1
    assert a.receive(b"\xee" + PATH[:7], ADDR_B, T0) == [] and a.stats["drop_truncated"] == 1


def test_handshake_drops_are_counted_each_time():
    cfg = TunnelConfig()
    a = Session(KA, IDB, PB, PATH, candidates=[ADDR_B], config=cfg)
    b = Session(KB, IDA, PA, PATH, role="wait", config=cfg)
    a.start(T0)
    b.start(T0)
    r1 = a.poll(T0)[0][0]
    r2 = a.poll(T0 + 0.25)[0][0]
    r3 = a.poll(T0 + 0.5)[0][0]
    b.receive(r2, ADDR_A, T0 + 1)
    for r in (r1, r1):  # older than the accepted one
        b.receive(r, ADDR_A, T0 + 2)
    assert b.stats["drop_handshake_replay"] == 2
    b.receive(r3, ADDR_A, T0 + 1.001)  # too soon after r2
    assert b.stats["drop_handshake_rate"] == 1
    resp = b.poll(T0 + 1)[0][0]
    for _ in range(2):
        b.receive(resp, ADDR_A, T0 + 3)  # a Response to a responder that sent no Request
    assert b.stats["drop_unexpected_response"] == 2
    for _ in range(2):
        a.receive(resp[:-1] + bytes([resp[-1] ^ 1]), ADDR_B, T0 + 3)
    assert a.stats["drop_handshake_mac"] == 2
    other = bytes(8)
    for _ in range(2):
        a.receive(resp[:1] + other + resp[9:], ADDR_B, T0 + 3)
    assert a.stats["drop_unknown_path"] == 2


def test_punch_collisions_are_counted_each_time():
    lo_key, hi_key = sorted([KA, KB], key=keys.node_id_of)
    lo = Session(lo_key, keys.node_id_of(hi_key), keys.public_bytes(hi_key), PATH, role="punch", candidates=[ADDR_B])
    hi = Session(hi_key, keys.node_id_of(lo_key), keys.public_bytes(lo_key), PATH, role="punch", candidates=[ADDR_A])
    lo.start(T0)
    hi.start(T0)
    lo.poll(T0)
    for t in (T0, T0 + 0.25):
        for d, _ in hi.poll(t):
            lo.receive(d, ADDR_B, t)
    assert lo.wins_collisions and not hi.wins_collisions
    assert lo.stats["drop_handshake_collision"] == 2


def test_keys_expire_each_time_and_only_an_initiating_side_starts_over():
    cfg = TunnelConfig(reject_after_time=5.0, rekey_after_time=100.0)
    for round_ in (1, 2):
        a, b, net = connect(cfg)
        if round_ == 2:  # expire, handshake again, expire again: two expiries on one session
            net.pump(T0 + 5.0)
            assert a.established and b.established
            a.poll(T0 + 10.1)
            b.poll(T0 + 10.1)
            assert a.stats["keys_expired"] == b.stats["keys_expired"] == 2
    a, b, _ = connect(TunnelConfig(reject_after_time=5.0, rekey_after_time=100.0), role_b="wait")
    b.candidates = [ADDR_A]  # a waiting side that knows where the peer is still does not initiate
    assert [d[0] for d, _ in a.poll(T0 + 5)] == [TYPE_HANDSHAKE_REQUEST]
    assert b.poll(T0 + 5) == [] and "request" not in b.deadlines()


def test_where_requests_go():
    a = Session(KA, IDB, PB, PATH)  # no candidates, no relay: nothing to send to, retry later
    a.start(T0)
    assert a.poll(T0) == [] and a.deadlines()["request"] == T0 + a.config.handshake_retransmit
    c = Session(KA, IDB, PB, PATH, candidates=[("10.0.0.5", 1), ADDR_B])
    c.start(T0)
    c.peer_addr = ADDR_A2  # learned from the peer before any keys: tried first
    assert [dst for _, dst in c.poll(T0)] == [ADDR_A2, ("10.0.0.5", 1), ADDR_B]
    a2, b2, _ = connect(TunnelConfig(rekey_after_time=10.0))
    a2.candidates = [("10.0.0.5", 1)]
    assert [dst for _, dst in a2.poll(T0 + 10.5)] == [ADDR_B]  # a rekey goes where the keys work


def test_a_response_from_an_unlisted_address_is_via_peer():
    a = Session(KA, IDB, PB, PATH, candidates=[ADDR_B])
    b = Session(KB, IDA, PA, PATH, role="wait")
    a.start(T0)
    b.start(T0)
    b.receive(a.poll(T0)[0][0], ADDR_A, T0)
    events = a.receive(b.poll(T0)[0][0], ADDR_A2, T0)  # answered from another address (NAT rebinding)
    assert a.via == "peer" and events[-1].via == "peer"


def test_moving_tells_only_those_who_should_hear():
    token = os.urandom(32)
    a, b, _ = connect()
    a.relay = RelayInfo(RELAY, token, 0)  # a relay is known, but not in use
    a.local_address_changed(T0)
    assert [(d[0], dst) for d, dst in a.datagrams_to_send()] == [(TYPE_KEEPALIVE, ADDR_B)]
    c = Session(KA, IDB, PB, PATH, candidates=[ADDR_B], relay=RelayInfo(RELAY, token, 0))
    c.start(T0)
    c.peer_addr = ADDR_B
    c.local_address_changed(T0)  # no keys yet: nothing to authenticate a keepalive with
    assert c.datagrams_to_send() == []
    before = a.stats["tx_keepalive"]
    a.local_address_changed(T0 + 1)
    a.local_address_changed(T0 + 2)  # moved twice: two keepalives, each counted
    assert a.stats["tx_keepalive"] == before + 2


def test_a_close_is_the_empty_33_byte_packet_and_needs_an_address():
    """docs/PROTOCOL.md §7: CLOSE is counter and tag only (33 bytes, empty payload). A session
    that knows no address of its peer has nowhere to send one: none is made (a CLOSE sealed
    anyway would spend a counter and go nowhere)."""
    a, b, _ = connect()
    close = a.close_packet(T0)
    assert close[0] == TYPE_CLOSE and len(close) == MIN_TRANSPORT_LEN
    a.peer_addr = None
    assert a.close_packet(T0) is None


@pytest.mark.parametrize("token, side", [(b"\x00" * 31, 0), (b"\x00" * 32, 2)])
def test_relay_info_must_be_well_formed(token, side):
    with pytest.raises(ValueError, match="^relay token must be 32 bytes and side 0 or 1$"):
        RelayInfo(RELAY, token, side)


def test_a_session_role_must_be_known():
    with pytest.raises(ValueError, match="^role must be initiate, wait or punch, not 'listen'$"):
        Session(KA, IDB, PB, PATH, role="listen")


def test_drops_on_the_slow_path_are_counted_each_time_and_bounded_exactly():
    cfg = TunnelConfig(reject_after_messages=1000, previous_key_grace=2.0, rekey_after_time=10.0)
    a, b, net = connect(cfg)
    at_limit = a.encrypt(b"x", T0)[:9] + (1000).to_bytes(8) + b"\x00" * 32  # counter == the limit
    below = a.encrypt(b"x", T0)[:9] + (999).to_bytes(8) + b"\x00" * 32
    oversize = below[:17] + b"\x00" * 65_500
    for _ in range(2):
        b.receive(at_limit, ADDR_A, T0)
        b.receive(oversize, ADDR_A, T0)
    b.receive(below, ADDR_A, T0)
    assert (b.stats["drop_too_old"], b.stats["drop_malformed"], b.stats["drop_bad_tag"]) == (2, 2, 1)
    biggest = a.encrypt(b"\x00" * MAX_PAYLOAD, T0)  # a datagram of exactly the maximum size
    assert data_of(b.receive(biggest, ADDR_A2, T0)) == [b"\x00" * MAX_PAYLOAD]  # via the slow path (new address)
    held = [a.encrypt(b"old", T0 + 9) for _ in range(2)]
    rtt = b.rtt
    t = T0 + 10.5
    for d, _ in a.poll(t):
        b.receive(d, ADDR_A2, t)
    net.addr_a = ADDR_A2
    net.pump(t)
    assert b.stats["rekeys"] == 1 and b.rtt == rtt  # a rekey does not overwrite the measured RTT
    for p in held:
        assert b.receive(p, ADDR_A2, b.previous.expires + 1) == []
    assert b.stats["drop_expired_key"] == 2


def test_data_after_the_keys_expired_is_dropped_not_raised():
    a, b, _ = connect(TunnelConfig(reject_after_time=5.0, rekey_after_time=100.0))
    late = a.encrypt(b"x", T0 + 1)
    b.poll(T0 + 6)  # b's keys are gone; it still knows where the peer is
    assert b.current is None and b.peer_addr == ADDR_A
    assert b.receive(late, ADDR_A, T0 + 6) == [] and b.stats["drop_no_keys"] == 1


def test_during_a_second_rekey_two_generations_of_keys_are_tried():
    """B holds current keys, unconfirmed next keys (it answered a new Request) and previous keys
    in their grace period: a packet on the previous keys still decrypts."""
    a, b, _, [held] = rekeyed(
        TunnelConfig(rekey_after_time=10.0, rekey_after_messages=30, previous_key_grace=5.0), held=1
    )
    t = T0 + 10.5
    while not a.has_output:  # a count rekey: a sends a new Request from the send path
        b.receive(a.encrypt(b"n", t), ADDR_A, t)
    for d, _ in a.datagrams_to_send():
        if d[0] == TYPE_HANDSHAKE_REQUEST:
            b.receive(d, ADDR_A, t + 0.1)
    assert b.next is not None and b.previous is not None
    assert data_of(b.receive(held, ADDR_A, t + 0.2)) == [b"old0"]


def test_handshake_rate_drops_are_counted_each_time():
    a = Session(KA, IDB, PB, PATH, candidates=[ADDR_B])
    b = Session(KB, IDA, PA, PATH, role="wait")
    a.start(T0)
    b.start(T0)
    reqs = [a.poll(T0 + 0.25 * i)[0][0] for i in range(3)]
    b.receive(reqs[0], ADDR_A, T0 + 1)
    b.receive(reqs[1], ADDR_A, T0 + 1.001)
    b.receive(reqs[2], ADDR_A, T0 + 1.002)
    assert b.stats["drop_handshake_rate"] == 2


def test_the_fast_paths_keep_the_key_limits_exactly():
    """Adversary: the peer (or anyone replaying its packets) relying on the fast send and receive
    paths skipping a check the slow paths make: no DATA is sent at or after the keys' reject time
    (also when it coincides with the rekey time), and a packet with the counter at the message
    limit is dropped as too old, the one before it still accepted."""
    cfg = TunnelConfig(rekey_after_time=5.0, reject_after_time=5.0, reject_after_messages=1 << 20)
    a, b, _ = connect(cfg)
    with pytest.raises(TunnelError, match="^tunnel keys exhausted; waiting for a rekey$"):
        a.encrypt(b"x", a.current.reject_time)
    a, b, _ = connect(TunnelConfig(reject_after_messages=1 << 20))
    with pytest.raises(TunnelError):
        a.encrypt(b"x", a.current.reject_time)

    def sealed_at(counter: int) -> bytes:
        header = HEADER.pack(TYPE_DATA, PATH, counter)
        return header + a.current.send.encrypt(NONCE_PREFIX + header[9:], b"late", header)

    limit = a.config.reject_after_messages
    assert b.receive(sealed_at(limit), ADDR_A, T0) == [] and b.stats["drop_too_old"] == 1
    assert data_of(b.receive(sealed_at(limit - 1), ADDR_A, T0)) == [b"late"]


def test_a_bind_acknowledged_after_the_handshake_resends_no_request():
    """Hostile condition: the relay acknowledges a bind refresh while the tunnel already runs
    through it. The Request that went there during the handshake is answered: sending it again
    would only make the peer spend a handshake (once per refresh)."""
    token = os.urandom(32)
    a = Session(KA, IDB, PB, PATH, relay=RelayInfo(RELAY, token, 0), wall=lambda: 1.0)
    b = Session(KB, IDA, PA, PATH, role="wait", relay=RelayInfo(RELAY, token, 1))
    a.start(T0)
    b.start(T0)
    (req,) = [d for d, dst in a.poll(T0) if d[0] == TYPE_HANDSHAKE_REQUEST and dst == RELAY]
    b.receive(req, RELAY, T0)
    for d, _ in b.poll(T0):
        a.receive(d, RELAY, T0)
    assert a.established
    a.datagrams_to_send()
    a.receive(RelayBindAck(PATH, 0, True, 1_000_000, bytes(16)).encode(), RELAY, T0 + 0.01)
    assert a.stats["relay_acks"] == 1
    assert [d[0] for d, _ in a.datagrams_to_send()] == []


def test_a_counter_jumping_to_the_top_costs_no_memory():
    """Adversary: a peer jumping its counter by 2**62 in one packet (valid on its keys): the replay
    window resets to that one counter instead of shifting its bitmap that far (which would try to
    allocate 2**62 bits)."""
    w = ReplayWindow(64)
    w.update(5)
    assert w.update(2**62) and (w.top, w.bits) == (2**62, 1)
    assert w.check(5) is not None and w.check(2**62 - 1) is None


def test_via_follows_a_move_onto_the_relay_but_not_a_roam():
    """The peer's packets arrive through the relay (its direct path died): `via` says "relay". A
    roam from one direct address to another keeps the `via` the handshake named."""
    a, b, _ = connect()
    a.relay = RelayInfo(RELAY, os.urandom(32), 0)
    via = a.via
    assert via != "relay"
    pkts = [b.encrypt(b"%d" % i, T0) for i in range(2)]
    a.receive(pkts[0], ADDR_A2, T0)
    assert a.peer_addr == ADDR_A2 and a.via == via
    a.receive(pkts[1], RELAY, T0)
    assert a.peer_addr == RELAY and a.via == "relay"


def test_a_rekey_by_count_starts_on_exactly_the_packet_that_reaches_it_on_the_slow_path():
    """Pings, keepalives and probes go through the slow send path: it too starts the rekey on the
    rekey_after_messages-th packet on the keys, not one before."""
    a, b, _ = connect(TunnelConfig(rekey_after_messages=20))
    for _ in range(20 - 1 - a.current.counter):
        a.ping(T0)
    assert not a.has_output
    a.ping(T0)  # counter 19: the 20th packet on these keys
    assert [d[0] for d, _ in a.datagrams_to_send()] == [TYPE_HANDSHAKE_REQUEST]


def test_the_fast_receive_path_survives_a_counter_jump_and_counts_each_keepalive():
    """Adversary: the peer (valid keys) jumping its counter by 2**61 on a DATA packet: the fast
    receive path resets its window instead of shifting the bitmap that far. Keepalives and
    standby packets are each counted."""
    a, b, _ = connect(TunnelConfig(reject_after_messages=1 << 62))
    header = HEADER.pack(TYPE_DATA, PATH, 1 << 61)
    jump = header + a.current.send.encrypt(NONCE_PREFIX + header[9:], b"far", header)
    assert data_of(b.receive(jump, ADDR_A, T0)) == [b"far"] and b.current.window.top == 1 << 61
    a2, b2, _ = connect()
    for _ in range(2):
        b2.receive(a2._seal(TYPE_KEEPALIVE, b"", T0), ADDR_A, T0)
        b2.receive(a2.standby(b"s", T0), ADDR_A2, T0)
    assert (b2.stats["rx_keepalive"], b2.stats["rx_standby"]) == (2, 2)

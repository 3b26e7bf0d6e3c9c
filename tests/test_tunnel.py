"""Sans-I/O tunnel session (docs/PROTOCOL.md §7): drops, replay window, rekey, roaming, relay."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings, strategies as st

from ntm import keys
from ntm.offload import Stretch
from ntm.packet import (
    PREFIX_LEN,
    TYPE_HANDSHAKE_REQUEST,
    TYPE_KEEPALIVE,
    TYPE_PING,
    TYPE_PONG,
    TYPE_RELAY_BIND,
    TYPE_STANDBY,
    RelayBind,
    TransportPacket,
)
from ntm.tunnel import (
    KEEPALIVE_INTERVAL,
    REPLAY_WINDOW,
    Data,
    EndpointChanged,
    HandshakeDone,
    PeerClosed,
    Pong,
    RelayInfo,
    ReplayWindow,
    Session,
    Standby,
    TunnelConfig,
    TunnelError,
)

KA, KB = keys.generate(), keys.generate()
PA, PB = keys.public_bytes(KA), keys.public_bytes(KB)
IDA, IDB = keys.node_id(PA), keys.node_id(PB)
PATH = os.urandom(8)
ADDR_A, ADDR_B, ADDR_A2, EVIL = ("10.0.0.1", 4330), ("10.0.0.2", 4330), ("10.9.9.9", 5555), ("6.6.6.6", 666)
RELAY = ("192.0.2.1", 4330)
T0 = 1700000000.0


class Net:
    """Delivers queued datagrams between two sessions; A's source address can move."""

    def __init__(self, a: Session, b: Session) -> None:
        self.a, self.b = a, b
        self.addr_a = ADDR_A
        self.events = {"a": [], "b": []}

    def pump(self, now: float, rounds: int = 10) -> None:
        for _ in range(rounds):
            moved = False
            for data, dst in self.a.poll(now):
                if dst == ADDR_B:
                    self.events["b"] += self.b.receive(data, self.addr_a, now)
                    moved = True
            for data, dst in self.b.poll(now):
                if dst == self.addr_a:
                    self.events["a"] += self.a.receive(data, ADDR_B, now)
                    moved = True
            if not moved:
                return


def connect(config=None, role_a="initiate", role_b="wait"):
    a = Session(KA, IDB, PB, PATH, role=role_a, candidates=[ADDR_B], config=config)
    b = Session(KB, IDA, PA, PATH, role=role_b, candidates=[ADDR_A] if role_b == "punch" else [], config=config)
    net = Net(a, b)
    a.start(T0)
    b.start(T0)
    net.pump(T0)
    assert a.established and b.established
    return a, b, net


def rekeyed(cfg, held: int = 0, at: float = T0 + 10.5):
    """A connected pair after one rekey by time at `at` (A initiates it), with `held` packets A
    sealed on the old keys just before, not yet delivered."""
    a, b, net = connect(cfg)
    old = [a.encrypt(b"old%d" % i, at - 1.5) for i in range(held)]
    for d, _ in a.poll(at):
        b.receive(d, ADDR_A, at)
    net.pump(at)
    assert a.stats["rekeys"] == b.stats["rekeys"] == 1
    return a, b, net, old


def data_of(events):
    return [e.payload for e in events if isinstance(e, Data)]


def test_handshake_and_data_both_ways():
    a, b, net = connect()
    assert a.via == "candidate:0" and a.peer_addr == ADDR_B and b.peer_addr == ADDR_A
    assert any(isinstance(e, HandshakeDone) and not e.rekey for e in net.events["a"])
    assert any(isinstance(e, HandshakeDone) for e in net.events["b"])
    assert b.receive(a.encrypt(b"ping", T0), ADDR_A, T0) == [Data(b"ping")]
    assert a.receive(b.encrypt(b"pong", T0), ADDR_B, T0) == [Data(b"pong")]
    assert a.stats["handshakes"] == b.stats["handshakes"] == 1


def test_send_before_handshake_raises_and_receive_without_keys_drops():
    a = Session(KA, IDB, PB, PATH, candidates=[ADDR_B])
    with pytest.raises(TunnelError):
        a.encrypt(b"x", T0)
    x, _, _ = connect()
    assert a.receive(x.encrypt(b"x", T0), ADDR_B, T0) == []
    assert a.stats["drop_no_keys"] == 1


def test_responder_waits_for_confirmation_before_sending():
    a = Session(KA, IDB, PB, PATH, candidates=[ADDR_B])
    b = Session(KB, IDA, PA, PATH, role="wait")
    a.start(T0)
    b.start(T0)
    ((req, _),) = a.poll(T0)
    b.receive(req, ADDR_A, T0)
    assert not b.established  # response may be lost: do not send on unconfirmed keys
    with pytest.raises(TunnelError):
        b.encrypt(b"x", T0)
    assert b.close_packet(T0) is None
    ((resp, _),) = b.poll(T0)
    assert a.receive(resp, ADDR_B, T0)[-1].rekey is False
    out = a.poll(T0)
    assert [d[0] for d, _ in out] == [TYPE_PING]  # immediate key confirmation, answered
    b.receive(out[0][0], ADDR_A, T0)
    assert b.established
    ((pong, _),) = b.poll(T0)
    assert pong[0] == TYPE_PONG and a.receive(pong, ADDR_B, T0) == []  # no Pong event: not the app's
    assert a.poll(T0 + 1) == [] and a.stats["confirms_sent"] == 1


def test_replay_dropped_and_counted():
    a, b, _ = connect()
    pkt = a.encrypt(b"once", T0)
    assert data_of(b.receive(pkt, ADDR_A, T0)) == [b"once"]
    for _ in range(3):
        assert b.receive(pkt, ADDR_A, T0) == []
    assert b.stats["drop_replay"] == 3
    assert data_of(b.receive(a.encrypt(b"next", T0), ADDR_A, T0)) == [b"next"]


def test_reordering_within_window_accepted():
    a, b, _ = connect()
    pkts = [a.encrypt(str(i).encode(), T0) for i in range(REPLAY_WINDOW)]
    got = []
    for p in reversed(pkts):  # worst reordering the window allows
        got += data_of(b.receive(p, ADDR_A, T0))
    assert len(got) == REPLAY_WINDOW and sorted(got) == sorted(str(i).encode() for i in range(REPLAY_WINDOW))
    stats = b.stats
    assert not any(v for k, v in stats.items() if k.startswith("drop_"))


def test_reordered_beyond_window_dropped():
    a, b, _ = connect()
    pkts = [a.encrypt(b"%d" % i, T0) for i in range(REPLAY_WINDOW + 5)]
    assert data_of(b.receive(pkts[-1], ADDR_A, T0))  # newest first
    assert b.receive(pkts[0], ADDR_A, T0) == []  # 2052 behind: outside the window
    assert b.receive(pkts[4], ADDR_A, T0) == []  # exactly WINDOW behind
    assert b.stats["drop_too_old"] == 2
    assert data_of(b.receive(pkts[5], ADDR_A, T0)) == [b"5"]  # WINDOW-1 behind: still inside
    assert data_of(b.receive(a.encrypt(b"more", T0), ADDR_A, T0)) == [b"more"]


def test_truncated_dropped():
    a, b, _ = connect()
    pkt = a.encrypt(b"hello world", T0)
    for n in (0, 1, 8, 9, 16, 17, 32):
        assert b.receive(pkt[:n], ADDR_A, T0) == []
    assert b.stats["drop_truncated"] == 7
    # cut inside the ciphertext: authenticates as nothing
    assert b.receive(pkt[:-1], ADDR_A, T0) == []
    assert b.stats["drop_bad_tag"] == 1
    assert data_of(b.receive(pkt, ADDR_A, T0)) == [b"hello world"]  # the real one is still fresh


def test_every_bit_flip_dropped_and_window_untouched():
    a, b, _ = connect()
    pkt = a.encrypt(b"payload", T0)
    for pos in range(len(pkt)):
        for bit in (0x01, 0x80):
            bad = bytearray(pkt)
            bad[pos] ^= bit
            assert data_of(b.receive(bytes(bad), ADDR_A, T0)) == []
    drops = sum(v for k, v in b.stats.items() if k.startswith("drop_"))
    assert drops == 2 * len(pkt)
    # a forged packet with a huge counter must not have advanced the window
    assert data_of(b.receive(pkt, ADDR_A, T0)) == [b"payload"]
    assert b.peer_addr == ADDR_A


def test_unknown_path_dropped():
    a, b, _ = connect()
    other = Session(KA, IDB, PB, b"\x00" * 8, candidates=[ADDR_B])
    pkt = bytearray(a.encrypt(b"x", T0))
    pkt[1:9] = b"\x00" * 8
    assert b.receive(bytes(pkt), ADDR_A, T0) == []
    other.start(T0)
    ((req, _),) = other.poll(T0)
    assert b.receive(req, ADDR_A, T0) == []  # Request for a path this session does not serve
    assert b.stats["drop_unknown_path"] == 2


def test_rekey_by_count_keeps_traffic_flowing():
    cfg = TunnelConfig(rekey_after_messages=8)
    a, b, net = connect(cfg)
    got = []
    for i in range(50):
        pkt = a.encrypt(b"%d" % i, T0 + i * 0.05)
        got += data_of(b.receive(pkt, net.addr_a, T0 + i * 0.05))
        net.pump(T0 + i * 0.05)
    assert got == [b"%d" % i for i in range(50)]
    assert a.stats["rekeys"] >= 5 and b.stats["rekeys"] >= 5
    assert a.stats["handshakes"] == b.stats["handshakes"]


def test_rekey_by_time_with_inflight_old_key_packets():
    cfg = TunnelConfig(rekey_after_time=10.0, previous_key_grace=2.0)
    a, b, net = connect(cfg)
    inflight = [a.encrypt(b"old%d" % i, T0 + 9) for i in range(3)]
    late = a.encrypt(b"too-late", T0 + 9)
    t = T0 + 10.5
    out = a.poll(t)
    assert [d[0] for d, _ in out] == [TYPE_HANDSHAKE_REQUEST]
    for d, _ in out:
        net.events["b"] += b.receive(d, ADDR_A, t)
    net.pump(t)
    assert a.stats["rekeys"] == 1 and b.stats["rekeys"] == 1
    assert data_of(b.receive(a.encrypt(b"new", t), ADDR_A, t)) == [b"new"]
    assert data_of(a.receive(b.encrypt(b"new-b", t), ADDR_B, t)) == [b"new-b"]
    # old-key packets still in flight decrypt during the grace period
    assert [data_of(b.receive(p, ADDR_A, t + 1)) for p in inflight] == [[b"old0"], [b"old1"], [b"old2"]]
    # after the grace period they do not
    b.poll(t + 3)
    assert b.receive(late, ADDR_A, t + 3) == []
    assert data_of(b.receive(a.encrypt(b"after", t + 3), ADDR_A, t + 3)) == [b"after"]


def test_simultaneous_rekey_collision_resolves():
    cfg = TunnelConfig(rekey_after_time=10.0, rekey_responder_extra=0.0)
    a, b, net = connect(cfg)
    t = T0 + 11
    reqs_a, reqs_b = a.poll(t), b.poll(t)  # both time out at once
    assert reqs_a and reqs_b
    for d, _ in reqs_a:
        net.events["b"] += b.receive(d, ADDR_A, t)
    for d, _ in reqs_b:
        net.events["a"] += a.receive(d, ADDR_B, t)
    net.pump(t)
    net.pump(t + 1.5)
    loser = b if IDA < IDB else a
    assert loser.stats["drop_handshake_collision"] == 0
    assert (a if IDA < IDB else b).stats["drop_handshake_collision"] == 1
    assert a.stats["rekeys"] == b.stats["rekeys"] == 1
    assert data_of(b.receive(a.encrypt(b"x", t + 2), ADDR_A, t + 2)) == [b"x"]
    assert data_of(a.receive(b.encrypt(b"y", t + 2), ADDR_B, t + 2)) == [b"y"]


def test_punch_both_initiate_one_handshake():
    a = Session(KA, IDB, PB, PATH, role="punch", candidates=[ADDR_B])
    b = Session(KB, IDA, PA, PATH, role="punch", candidates=[ADDR_A])
    a.start(T0)
    b.start(T0)
    out_a, out_b = a.poll(T0), b.poll(T0)  # both Requests cross on the wire
    for d, _ in out_a:
        b.receive(d, ADDR_A, T0)
    for d, _ in out_b:
        a.receive(d, ADDR_B, T0)
    Net(a, b).pump(T0)
    assert a.established and b.established
    assert a.stats["handshakes"] == b.stats["handshakes"] == 1
    winner, loser = (a, b) if IDA < IDB else (b, a)
    assert winner.stats["drop_handshake_collision"] == 1 and loser.stats["drop_handshake_collision"] == 0
    assert winner.current.initiator and not loser.current.initiator
    assert data_of(b.receive(a.encrypt(b"x", T0), ADDR_A, T0)) == [b"x"]


def test_roaming_only_on_authenticated_fresh_packets():
    a, b, _ = connect()
    p1, p2, p3 = (a.encrypt(b"%d" % i, T0) for i in range(3))
    assert data_of(b.receive(p1, ADDR_A, T0)) == [b"0"]
    # replayed from a new address: dropped, endpoint unchanged
    assert b.receive(p1, EVIL, T0) == []
    # forged (bit-flipped) from a new address: dropped, unchanged
    assert b.receive(p2[:-1] + bytes([p2[-1] ^ 1]), EVIL, T0) == []
    # garbage and a forged Request from a new address: unchanged
    b.receive(os.urandom(80), EVIL, T0)
    assert b.peer_addr == ADDR_A
    # authenticated, newest packet from a new address: the peer roamed
    ev = b.receive(p3, ADDR_A2, T0)
    assert Data(b"2") in ev and EndpointChanged(ADDR_A2, ADDR_A) in ev
    assert b.peer_addr == ADDR_A2
    # an older (reordered) but authentic packet from the old address does not move it back
    assert data_of(b.receive(p2, ADDR_A, T0)) == [b"1"]
    assert b.peer_addr == ADDR_A2
    assert b.stats["endpoint_changes"] == 1


def test_replayed_handshake_request_from_new_address_does_not_move():
    a = Session(KA, IDB, PB, PATH, candidates=[ADDR_B])
    b = Session(KB, IDA, PA, PATH, role="wait")
    a.start(T0)
    b.start(T0)
    net = Net(a, b)
    ((req, _),) = a.poll(T0)
    b.receive(req, ADDR_A, T0)
    for d, _ in b.poll(T0):
        a.receive(d, ADDR_B, T0)
    net.pump(T0)
    assert b.receive(req, EVIL, T0 + 1) == []
    assert b.stats["drop_handshake_replay"] == 1 and b.peer_addr == ADDR_A


def test_keepalive_when_idle_and_none_when_busy():
    a, b, _ = connect()
    assert a.poll(T0 + 1) == []
    t = T0 + KEEPALIVE_INTERVAL + 0.1
    out = a.poll(t)
    assert len(out) == 1 and out[0][0][0] == TYPE_KEEPALIVE and out[0][1] == ADDR_B
    assert b.receive(out[0][0], ADDR_A, t) == []
    assert b.stats["rx_keepalive"] >= 1
    assert a.next_timer() == pytest.approx(t + KEEPALIVE_INTERVAL)
    a.encrypt(b"busy", t + 20)
    assert a.poll(t + KEEPALIVE_INTERVAL + 1) == []  # sent data 6 s ago: no keepalive


def test_ping_pong_rtt():
    a, b, _ = connect()
    ping = a.ping(T0)
    b.receive(ping, ADDR_A, T0 + 0.010)
    ((pong, dst),) = b.poll(T0 + 0.010)
    assert dst == ADDR_A
    ev = a.receive(pong, ADDR_B, T0 + 0.020)
    assert ev == [Pong(pytest.approx(0.020))]
    assert a.rtt == pytest.approx(0.020)


def test_close_is_authenticated_and_not_replayable():
    a, b, _ = connect()
    close = a.close_packet(T0)
    forged = bytearray(close)
    forged[-1] ^= 1
    assert b.receive(bytes(forged), ADDR_A, T0) == []  # a flipped bit is no CLOSE
    assert b.stats["drop_bad_tag"] == 1
    assert b.receive(close, ADDR_A, T0) == [PeerClosed()]
    assert b.receive(close, ADDR_A, T0) == []  # replayed: dropped by the window
    assert b.stats["drop_replay"] == 1
    assert Session(KA, IDB, PB, PATH, candidates=[ADDR_B]).close_packet(T0) is None  # no keys, no CLOSE


def test_request_retransmitted_to_all_candidates_then_relay_fallback():
    token = os.urandom(32)
    cands = [("10.1.1.1", 1), ("10.1.1.2", 2)]
    a = Session(KA, IDB, PB, PATH, candidates=cands, relay=RelayInfo(RELAY, token, 0))
    b = Session(KB, IDA, PA, PATH, role="wait", candidates=[ADDR_A], relay=RelayInfo(RELAY, token, 1))
    a.start(T0)
    b.start(T0)
    first = a.poll(T0)
    assert [dst for _, dst in first] == cands and first[0][0] == first[1][0]
    assert a.poll(T0 + 0.1) == []
    again = a.poll(T0 + 0.26)
    assert [dst for _, dst in again] == cands and again[0][0] != first[0][0]  # a fresh Request
    assert b.poll(T0 + 1.0) == []
    # 1.5 s: both sides bind at the relay; A also sends its Request there
    t = T0 + 1.5
    out_a, out_b = a.poll(t), b.poll(t)
    bind_b = [d for d, dst in out_b if dst == RELAY]
    sent = RelayBind.parse(bind_b[0])
    assert (sent.path_id, sent.side) == (PATH, 1) and sent.verify(token)  # MAC'd with B's side key
    kinds_a = [(d[0], dst) for d, dst in out_a]
    assert (TYPE_RELAY_BIND, RELAY) in kinds_a and (TYPE_HANDSHAKE_REQUEST, RELAY) in kinds_a
    # relay forwards A's Request to B, B's answer to A; both see the relay as the peer
    for d, dst in out_a:
        if dst == RELAY and d[0] == TYPE_HANDSHAKE_REQUEST:
            b.receive(d, RELAY, t)
    for d, dst in b.poll(t):
        ev = a.receive(d, RELAY, t)
    assert ev[-1] == HandshakeDone(False, RELAY, "relay")
    for d, dst in a.poll(t):
        b.receive(d, RELAY, t)
    assert a.established and b.established and a.via == b.via == "relay"
    assert data_of(b.receive(a.encrypt(b"via relay", t), RELAY, t)) == [b"via relay"]
    # on the relay, the bind is refreshed with the keepalive period
    out = b.poll(t + KEEPALIVE_INTERVAL + 1)
    assert any(d[0] == TYPE_RELAY_BIND for d, _ in out)


def test_relay_route_without_candidates_binds_at_once():
    """A relay route (the DC gave no direct candidates) uses the relay from the start: nothing
    direct to wait 1.5 s for (found by the NAT lab: every relayed tunnel took >= 1.5 s)."""
    token = os.urandom(32)
    a = Session(KA, IDB, PB, PATH, relay=RelayInfo(RELAY, token, 0))
    b = Session(KB, IDA, PA, PATH, role="wait", relay=RelayInfo(RELAY, token, 1))
    a.start(T0)
    b.start(T0)
    assert a.next_timer() == T0 and b.next_timer() == T0
    out_a, out_b = a.poll(T0), b.poll(T0)
    assert (TYPE_RELAY_BIND, RELAY) in [(d[0], dst) for d, dst in out_a]
    assert (TYPE_HANDSHAKE_REQUEST, RELAY) in [(d[0], dst) for d, dst in out_a]
    assert [(d[0], dst) for d, dst in out_b] == [(TYPE_RELAY_BIND, RELAY)]


def test_replay_window_unit():
    w = ReplayWindow(8)
    assert w.check(0) is None and w.update(0)
    assert w.check(0) == "replay"
    assert w.update(5) and w.check(3) is None and not w.update(3)
    assert w.check(3) == "replay"
    w.update(100)
    assert w.check(92) == "too_old" and w.check(93) is None and w.check(100) == "replay"


def test_transport_packet_roundtrip():
    a, _, _ = connect()
    p = TransportPacket.parse(a.encrypt(b"abc", T0))
    assert p.path_id == PATH and p.counter == a.current.counter - 1 and len(p.ciphertext) == 3 + 16


def test_an_unverified_candidate_gets_one_request_verified_ones_keep_trying():
    """Reflection bound (issue 11 item 1, PROTOCOL §8.1): an address the DC did not see the peer
    send from gets UNVERIFIED_ATTEMPTS Tunnel Requests in all, however long the handshake runs;
    the verified candidate gets one every retransmission interval."""
    a = Session(KA, IDB, PB, PATH, role="initiate", candidates=[ADDR_B], unverified=[EVIL, ADDR_A2])
    a.start(T0)
    sent: dict = {}
    t = T0
    while t < T0 + 8.0:
        for data, dst in a.poll(t):
            sent[dst] = sent.get(dst, 0) + 1
        t += 0.05
    assert sent[EVIL] == sent[ADDR_A2] == 1
    assert sent[ADDR_B] >= 20
    a2 = Session(KA, IDB, PB, PATH, role="initiate", candidates=[ADDR_B], unverified=[EVIL])
    b = Session(KB, IDA, PA, PATH, role="wait")  # the verified candidate completes the handshake
    a2.start(T0)
    b.start(T0)
    Net(a2, b).pump(T0)
    assert a2.established and b.established


def test_standby_proves_an_address_without_moving_the_peer():
    """Issue 22 item 4: a STANDBY from a second uplink's address is authenticated proof that the
    address reaches the peer, but must not move the peer there (the current path stays), nor count
    as life on the current path, nor as a send on it (its keepalive stays due). A replayed or
    forged one from a stranger's address yields nothing."""
    a, b, _ = connect()
    last_sent, last_heard = a.last_sent, b.last_received
    pkt = a.standby(b"hello", T0 + 1)
    assert a.last_sent == last_sent
    assert b.receive(pkt, ADDR_A2, T0 + 1) == [Standby(ADDR_A2, b"hello")]
    assert b.peer_addr == ADDR_A and b.stats["endpoint_changes"] == 0 and b.stats["rx_standby"] == 1
    assert b.last_received == last_heard
    assert b.receive(pkt, EVIL, T0 + 2) == []  # replayed
    assert b.receive(pkt[:-1] + bytes([pkt[-1] ^ 1]), EVIL, T0 + 2) == []  # forged
    on_path = a.standby(b"", T0 + 3)
    assert b.receive(on_path, ADDR_A, T0 + 3) == [Standby(ADDR_A, b"")] and b.last_received == T0 + 3
    assert TransportPacket.parse(on_path).type == TYPE_STANDBY


def _twin_receivers() -> tuple[Session, Session, Session]:
    """A sender and two receivers holding the same keys (deterministic randomness and wall time,
    so both handshakes are the same bytes): one gets every datagram through receive(), the
    other whole runs through receive_run()."""
    pairs = _twin_pairs()
    return pairs[0][0], pairs[0][1], pairs[1][1]


def _twin_pairs(config: TunnelConfig | None = None) -> list[tuple[Session, Session]]:
    """Two connected pairs whose sessions hold the same keys, counters and state."""
    pairs = []
    for _ in range(2):
        seq = iter(range(1, 10**6))

        def rand(n: int, seq=seq) -> bytes:  # this pair's sequence, also after the loop
            return hashlib.shake_256(next(seq).to_bytes(8, "big")).digest(n)

        a = Session(KA, IDB, PB, PATH, candidates=[ADDR_B], rand=rand, wall=lambda: T0, config=config)
        b = Session(KB, IDA, PA, PATH, role="wait", rand=rand, wall=lambda: T0, config=config)
        net = Net(a, b)
        a.start(T0)
        b.start(T0)
        net.pump(T0)
        assert a.established and b.established
        pairs.append((a, b))
    return pairs


# One datagram of a run: a fresh DATA packet, a replay of an earlier one, one with a flipped bit,
# one of another path, a PING (transport but not DATA: the slow path), an old one (reordered).
_RUN_ITEMS = st.lists(
    st.sampled_from(["new", "new", "new", "replay", "flip", "other_path", "ping", "old", "untyped"]),
    min_size=1,
    max_size=24,
)


@settings(max_examples=60, deadline=None)
@given(
    runs=st.lists(
        st.tuples(_RUN_ITEMS, st.booleans(), st.sampled_from(["", "short", "runt", "stub", "bare", "other_runt"])),
        min_size=1,
        max_size=4,
    )
)
def test_receive_run_is_receive_per_datagram(runs):
    """Adversary: replays, forgeries, reordering and another path's packets inside one GRO run,
    from the peer's address or a stranger's, the last maybe shorter (a short DATA packet, a runt of
    ours too short for a transport header, a bare type and path ID, a stub too short for a path ID,
    another path's runt), and datagrams of our path ID behind a type no transport packet has. receive_run on
    the whole run gives the same
    payloads, events, drop counters, replay window and replies as receive() per datagram."""
    a, b1, b2 = _twin_receivers()
    sent: list[bytes] = []
    other = os.urandom(8)
    now = T0 + 1
    for items, from_peer, short_last in runs:
        addr = ADDR_A if from_peer else EVIL
        run = []
        for item in items:
            if item == "new" or not sent:
                sent.append(a.encrypt(os.urandom(8), now))
                run.append(sent[-1])
            elif item == "replay":
                run.append(sent[-1])
            elif item == "flip":
                run.append(sent[-1][:-1] + bytes([sent[-1][-1] ^ 1]))
            elif item == "other_path":
                run.append(sent[-1][:1] + other + sent[-1][9:])
            elif item == "ping":
                run.append(a.ping(now))
            elif item == "untyped":  # our path ID behind a type that is no transport packet's
                run.append(bytes([0x7F]) + PATH + os.urandom(len(sent[-1]) - PREFIX_LEN))
            else:  # old: a counter skipped so far (sent, held back, now late)
                held = a.encrypt(os.urandom(8), now)
                sent.append(a.encrypt(os.urandom(8), now))
                run += [sent[-1], held]
        size = len(run[0])
        assert all(len(d) == size for d in run)  # a GRO run: equal sizes, but for the last
        if short_last == "short":
            run.append(a.encrypt(os.urandom(3), now))
        elif short_last == "other_runt":  # another path's, too short for a transport header
            run.append(a.encrypt(b"", now)[:1] + other + bytes(11))
        elif short_last:  # ours cut short: a runt, a bare type and path ID, a stub
            run.append(a.encrypt(b"", now)[: {"runt": 20, "bare": PREFIX_LEN, "stub": 5}[short_last]])
        got1, got2 = [], []
        for d in run:
            if d[1:9] == PATH:  # the endpoint hands b1 only its own path's datagrams
                got1 += [("data", e.payload) if isinstance(e, Data) else e for e in b1.receive(d, addr, now)]
        n, off = sum(map(len, run)), 0
        buf = memoryview(bytearray(b"".join(run) + sent[0]))  # the buffer goes on past the read
        while off < n:
            payloads, events, stop = b2.receive_run(buf, off, n, size, addr, now)
            got2 += [("data", p) for p in payloads] + [
                ("data", e.payload) if isinstance(e, Data) else e for e in events
            ]
            off = stop if stop > off else off + size  # another path's: the endpoint dispatches it
        assert got2 == got1
        assert b2.stats == b1.stats
        assert (b2.current.window.top, b2.current.window.bits) == (b1.current.window.top, b1.current.window.bits)
        assert (b2.peer_addr, b2.last_received) == (b1.peer_addr, b1.last_received)
        assert b2.poll(now) == b1.poll(now)  # PONGs: same keys and counters, same bytes
        now += 0.5


def test_receive_run_through_cached_slots_is_receive_per_datagram(monkeypatch):
    """The same adversaries with every run's datagrams read through cached slots (tunnel._slots,
    kept for full-size segments only: here for any length). Slots are made only once a datagram
    of a GRO run authenticated: a stranger's run of any length never makes one."""
    import ntm.tunnel as tunnel

    made: list[int] = []
    real = tunnel._slots
    monkeypatch.setattr(tunnel, "SLOT_MIN_LEN", 0)
    monkeypatch.setattr(tunnel, "_slots", lambda buf, seg: made.append(seg) or real(buf, seg))
    test_receive_run_is_receive_per_datagram()
    test_the_replay_window_keeps_its_size_over_a_long_run()
    assert made
    made.clear()
    a, b, _ = _twin_receivers()
    forged = [bytearray(a.encrypt(os.urandom(1200), T0 + 1)) for _ in range(4)]
    for d in forged:
        d[-1] ^= 1
    buf = memoryview(bytearray(b"".join(forged)))
    assert b.receive_run(buf, 0, len(buf), len(forged[0]), ADDR_A, T0 + 1)[0] == [] and made == []


@pytest.mark.parametrize("payload_len", [0, 8])
def test_a_run_of_the_peers_data_is_decrypted_in_one_call_in_place(payload_len):
    """The fast path (issue 23): fresh DATA from the peer, one packet reordered within the window,
    all come out of one receive_run call as payloads (no slow-path events), the whole read taken,
    and the replay window then refuses each of them again."""
    a, b, _ = _twin_receivers()
    held = a.encrypt(os.urandom(payload_len), T0 + 1)
    run = [a.encrypt(os.urandom(payload_len), T0 + 1) for _ in range(5)] + [held]
    run += [a.encrypt(os.urandom(payload_len), T0 + 1) for _ in range(3)]
    buf = memoryview(bytearray(b"".join(run)))
    payloads, events, stop = b.receive_run(buf, 0, len(buf), len(run[0]), ADDR_A, T0 + 1)
    assert len(payloads) == len(run) and all(len(p) == payload_len for p in payloads)
    assert events == [] and stop == len(buf) and b.rx_data == len(run)
    assert b.receive_run(buf, 0, len(buf), len(run[0]), ADDR_A, T0 + 2)[0] == []  # replays, all


@settings(max_examples=40, deadline=None)
@given(
    runs=st.lists(
        st.tuples(st.lists(st.integers(0, 1500), min_size=1, max_size=12), st.sampled_from([1.0, 130.0])),
        min_size=1,
        max_size=5,
    )
)
def test_encrypt_segments_is_encrypt_per_segment(runs):
    """Condition: runs of segments sealed in place (issue 23) across a count-triggered rekey (every
    7 packets) and with the keys past their rekey time. The datagrams, counters, stats and the
    rekey Requests are byte for byte those of encrypt() per segment: no counter is used twice or
    skipped, nothing on the wire changes."""
    cfg = TunnelConfig(rekey_after_messages=7, rekey_after_time=120.0)
    (a1, b1), (a2, b2) = _twin_pairs(cfg)
    for sizes, dt in runs:
        now = T0 + dt
        src = os.urandom(sum(sizes))
        cuts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        want = [a1.encrypt(src[x:y], now) for x, y in zip(cuts, cuts[1:])]
        out = memoryview(bytearray(sum(map(len, want)) + 100))
        ends = a2.encrypt_segments(iter(zip(cuts, cuts[1:])), memoryview(src), out, now)
        assert [bytes(out[x:y]) for x, y in zip([0, *ends], ends)] == want
        assert a2.stats == a1.stats and a2.current.counter == a1.current.counter
        assert a2.poll(now) == a1.poll(now)  # the same rekey Requests
        for d in want:  # the peer takes them (the rekeys complete)
            b1.receive(d, ADDR_A, now)


@settings(max_examples=40, deadline=None)
@given(
    runs=st.lists(
        st.tuples(
            st.integers(1, 6),
            st.integers(2, 12),
            st.integers(0, 4),
            st.integers(1, 1400),
            st.sampled_from([1.0, 130.0]),
        ),
        min_size=1,
        max_size=5,
    ),
    limit=st.integers(1, 20),
)
def test_encrypt_segments_seals_a_stretch_as_encrypt_per_segment(runs, limit):
    """Condition: stretches (ntm/offload.Stretch: headers written by the sealing loop) between
    plain segments, sealed in GSO runs of at most `limit` packets, across count-triggered rekeys
    (every 7 packets: a stretch then goes through encrypt() one segment at a time) and keys past
    their rekey time. The datagrams, counters, stats and rekey Requests are byte for byte those of
    encrypt() per segment, the plaintexts the ones Stretch.cut writes."""
    cfg = TunnelConfig(rekey_after_messages=7, rekey_after_time=120.0)
    (a1, b1), (a2, b2) = _twin_pairs(cfg)
    for hl, count, before, size, dt in runs:
        now = T0 + dt
        count = min(count, limit - before % limit)  # within a GSO run, as split_into cuts them
        if count < 2:
            continue
        head = os.urandom(hl + 4)
        stretch = Stretch(before * size + 3, count, size, head, hl, int.from_bytes(os.urandom(4), "big"))
        src = bytearray(os.urandom(3 + (before + count) * size + len(head) + 5))
        plain = [(3 + i * size, 3 + (i + 1) * size) for i in range(before)]  # a stretch's headers land on their tails
        want_src = bytearray(src)
        want = [a1.encrypt(bytes(want_src[x:y]), now) for x, y in plain]
        for x, y in stretch.cut(want_src):
            want.append(a1.encrypt(bytes(want_src[x:y]), now))
        items = iter([*plain, stretch])
        out = memoryview(bytearray(sum(map(len, want)) + 100))
        got = []
        while True:
            ends = a2.encrypt_segments(items, memoryview(src), out, now, limit)
            if not ends:
                break
            assert len(ends) <= limit
            got += [bytes(out[x:y]) for x, y in zip([0, *ends], ends)]
        assert got == want and src == want_src
        assert a2.stats == a1.stats and a2.current.counter == a1.current.counter
        assert a2.poll(now) == a1.poll(now)  # the same rekey Requests
        for d in want:
            b1.receive(d, ADDR_A, now)


def test_keys_used_up_partway_through_a_stretch_lose_no_segment():
    """Condition: the keys reach their hard limit (a rekey that never completed) in the middle of
    a super-packet's stretch, sealed in GSO runs as Endpoint.send_segments does. Every segment is
    either sealed, each counter once, or given back to the caller (ntm/offload.Cuts) with its bytes
    intact, for the data plane to queue while the tunnel reopens: none is lost."""
    from daemon import udpgso
    from ntm.offload import flatten, split, split_into
    from ntm.packet import MIN_TRANSPORT_LEN
    from test_offload import simple_flow

    a, b, _ = connect(TunnelConfig(rekey_after_messages=20, reject_after_messages=40))
    hdr, pkt = simple_flow(v6=True).kernel_super(bytes(i & 0xFF for i in range(62000)), 1440)
    want = split(hdr, pkt, 1000, True)
    buf = bytearray(hdr.pack() + pkt)
    per_send = udpgso.segments_per_send(1000 + MIN_TRANSPORT_LEN)
    segments = split_into(hdr, buf, len(hdr.pack()), len(buf), 1000, True, per_send)
    out, sent, first = memoryview(bytearray(udpgso.RECV_BUFFER)), [], a.current.counter
    with pytest.raises(TunnelError):
        while ends := a.encrypt_segments(segments, memoryview(buf), out, T0 + 0.5, per_send):
            sent += [bytes(out[x:y]) for x, y in zip([0, *ends], ends)]
    left = [bytes(buf[x:y]) for x, y in flatten(segments, buf)]
    assert len(sent) == 40 - first and a.current.counter == 40  # up to the limit, each counter once
    assert [b.receive(d, ADDR_A, T0 + 0.5)[0].payload for d in sent] + left == want


def test_encrypt_segments_refuses_without_keys_and_never_reuses_a_counter():
    """Hostile conditions: no keys (the first segment is refused, nothing else taken), a segment
    longer than a datagram carries (after the first: the run ends before it, the rest left), and a
    send buffer too short (the error leaves the counter past every packet sealed)."""
    a = Session(KA, IDB, PB, PATH, candidates=[ADDR_B])
    segs = iter([(0, 10), (10, 20)])
    with pytest.raises(TunnelError):
        a.encrypt_segments(segs, memoryview(bytes(20)), memoryview(bytearray(100)), T0)
    assert next(segs) == (10, 20)
    a, _, _ = _twin_receivers()
    big, counter = memoryview(bytes(70000)), a.current.counter
    segs = iter([(0, 10), (0, 66000), (0, 20)])
    assert a.encrypt_segments(segs, big, memoryview(bytearray(100)), T0 + 1) == [43]
    assert list(segs) == [(0, 20)] and a.current.counter == counter + 1 and a.tx_data == 1
    with pytest.raises(ValueError):
        a.encrypt_segments(iter([(0, 10), (0, 100)]), big, memoryview(bytearray(100)), T0 + 1)
    assert a.current.counter == counter + 2 and a.tx_data == 2  # the first was sealed: its counter is gone


def test_the_replay_window_keeps_its_size_over_a_long_run():
    """Condition: one read longer than the replay window (2,100 packets, as a long-lived GRO
    stream adds up), ended by a forgery (the slow path takes over the window and drops it). The
    window written back is the 2,048-bit one receive() keeps: the oldest counters fall out of it
    and come back as too old."""
    a, b, _ = _twin_receivers()
    run = [a.encrypt(b"", T0 + 1) for _ in range(REPLAY_WINDOW + 52)]
    forged = a.encrypt(b"", T0 + 1)
    buf = memoryview(bytearray(b"".join(run) + forged[:-1] + bytes([forged[-1] ^ 1])))
    assert len(b.receive_run(buf, 0, len(buf), len(run[0]), ADDR_A, T0 + 1)[0]) == len(run)
    assert b.stats["drop_bad_tag"] == 1
    assert b.current.window.bits == (1 << REPLAY_WINDOW) - 1
    assert b.receive(run[0], ADDR_A, T0 + 1) == [] and b.stats["drop_too_old"] == 1

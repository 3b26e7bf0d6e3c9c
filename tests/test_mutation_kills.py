"""What an attacker could do if a security check were missing: one test per check that mutation
testing found untested (`make mutate`, scripts/mutate.py). Each fails with the check removed.

Tunnel tests drive two sans-I/O sessions by hand and never call poll() between the moment keys
expire and the moment the attacker's packet arrives: a check that only the timers enforce would
let it through.
"""

from __future__ import annotations

import os

import coincurve
import pytest

from ntm import envelope, keys, record
from ntm.errors import SignatureError
from ntm.packet import PREFIX_LEN, TYPE_RELAY_BIND, TYPE_RELAY_BIND_ACK, RelayBind, RelayBindAck
from ntm.tunnel import REJECT_AFTER_TIME, Data, RelayBound, RelayInfo, Session, TunnelConfig
from tests.test_tunnel import ADDR_A, ADDR_A2, ADDR_B, IDB, KA, PATH, PB, T0, connect, data_of, rekeyed

NOW_MS = 1_700_000_000_000


# --- keys.recover: only v = 27/28, like the contract's ecrecover ------------------------------
def _small_r_signature(digest: bytes) -> bytes:
    """A low-s signature (r, s) whose r + n is an x-coordinate on the curve, so recovery id 2
    (v = 29) yields a key: a second "signer" for the same r, s that ecrecover would never accept."""
    s = 12345
    for r in range(1, 200):
        try:
            coincurve.PublicKey.from_signature_and_message(
                r.to_bytes(32, "big") + s.to_bytes(32, "big") + b"\x02", digest, hasher=None
            )
        except ValueError:
            continue
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    raise AssertionError("no small r with a recovery id 2 point found")


@pytest.mark.parametrize("v", [29, 30, 0, 1])
def test_a_signature_with_v_outside_27_28_is_refused(v):
    digest = os.urandom(32)
    rs = _small_r_signature(digest)
    with pytest.raises(SignatureError, match="v is"):
        keys.recover(digest, rs + bytes([v]))


# --- NodeTransaction.sign: a key signs only its own node's records ----------------------------
def test_a_key_cannot_sign_a_record_for_another_node():
    victim = keys.node_id_of(keys.generate())
    rec = record.NodeTransaction(victim, b"\x22" * 20, NOW_MS)
    with pytest.raises(ValueError, match="^the key does not belong to this record's node$"):
        rec.sign(keys.generate(), record.Domain(31337, b"\x5f" * 20))


# --- envelopes: freshness both ways, and the replay guard covers the whole window --------------
DC = keys.generate()
TRUSTED = staticmethod(lambda a: a == keys.node_id_of(DC))


@pytest.mark.parametrize(
    "offset_ms, fresh",
    [(envelope.MAX_SKEW_MS + 1, False), (envelope.MAX_SKEW_MS, True), (-envelope.MAX_SKEW_MS - 1, False)],
)
def test_an_envelope_dated_too_far_ahead_or_behind_is_refused(offset_ms, fresh):
    env = envelope.seal(DC, "k", {}, NOW_MS + offset_ms)
    if fresh:
        envelope.open_envelope(env, "k", NOW_MS, TRUSTED)
    else:
        with pytest.raises(SignatureError, match="freshness"):
            envelope.open_envelope(env, "k", NOW_MS, TRUSTED)


def test_a_replay_is_refused_for_as_long_as_the_envelope_is_fresh():
    """Dated at the future edge when first seen, an envelope stays fresh for two windows: the
    guard must remember its nonce that long, or the replay at the end of the window gets in."""
    env = envelope.seal(DC, "k", {}, NOW_MS + envelope.MAX_SKEW_MS)
    guard = envelope.ReplayGuard()
    envelope.open_envelope(env, "k", NOW_MS, TRUSTED, guard)
    later = NOW_MS + 2 * envelope.MAX_SKEW_MS - 1
    with pytest.raises(SignatureError, match="replayed"):
        envelope.open_envelope(env, "k", later, TRUSTED, guard)


# --- tunnel keys: expired keys, previous keys after the grace, replays during the grace --------
def test_packets_on_keys_past_reject_after_time_are_dropped_on_both_paths():
    a, b, _ = connect()
    fast = a.encrypt(b"from the same address", T0 + 1)
    slow = a.encrypt(b"from a new address", T0 + 1)
    late = T0 + REJECT_AFTER_TIME + 1  # b's timers have not run: only the receive check stands
    assert b.receive(fast, ADDR_A, late) == []  # fast path: DATA from the known peer
    assert b.receive(slow, ADDR_A2, late) == []  # slow path: would also roam the peer away
    assert b.stats["drop_expired_key"] == 2 and b.peer_addr == ADDR_A


def _rekeyed_pair(grace: float):
    a, b, _, held = rekeyed(TunnelConfig(rekey_after_time=10.0, previous_key_grace=grace), held=2)
    return a, b, held, T0 + 10.5


def test_previous_keys_stop_working_after_their_grace_period():
    _, b, held, t = _rekeyed_pair(grace=2.0)
    assert b.receive(held[0], ADDR_A, t + 2.5) == []  # no poll() in between
    assert b.stats["drop_expired_key"] == 1


def test_a_packet_on_previous_keys_is_accepted_once_during_the_grace_period():
    _, b, held, t = _rekeyed_pair(grace=5.0)
    assert data_of(b.receive(held[0], ADDR_A, t + 1)) == [b"old0"]
    assert b.receive(held[0], ADDR_A, t + 1) == []
    assert b.stats["drop_replay"] == 1


# --- the responder never sends on keys the initiator has not confirmed -------------------------
def test_a_lost_rekey_response_does_not_cut_the_responders_traffic():
    """B answers A's rekey Request, and the Response is lost (dropped by an on-path attacker).
    B must keep sending on the keys A has; had it switched, A could not read anything from B."""
    a, b, _ = connect(TunnelConfig(rekey_after_time=10.0))
    t = T0 + 10.5
    requests = [d for d, _ in a.poll(t)]
    for d in requests:
        b.receive(d, ADDR_A, t)
    b.poll(t)  # the Response: lost
    assert data_of(a.receive(b.encrypt(b"still readable", t), ADDR_B, t)) == [b"still readable"]


# --- relay: a bind acknowledgement counts only from the relay ----------------------------------
def test_a_relay_bind_ack_from_anyone_but_the_relay_is_ignored():
    relay = ("192.0.2.1", 4340)
    s = Session(KA, IDB, PB, PATH, relay=RelayInfo(relay, os.urandom(32), 0), wall=lambda: 5.0)
    s.start(T0)
    s.poll(T0)  # no candidates: it binds at the relay at once (counter 5,000,000)
    ack = RelayBindAck(PATH, 0, True, 5_000_000, bytes(16)).encode()
    assert len(ack) == PREFIX_LEN + 26 and ack[0] == TYPE_RELAY_BIND_ACK
    assert s.receive(ack, ("203.0.113.66", 4340), T0) == []
    assert s.stats["relay_acks"] == 0
    stale = RelayBindAck(PATH, 0, True, 4_999_999, bytes(16)).encode()  # not our latest bind
    assert s.receive(stale, relay, T0) == [] and s.stats["relay_acks"] == 0
    assert s.receive(ack, relay, T0) == [RelayBound(relay)]


def test_a_relay_cookie_makes_the_session_bind_again_with_it():
    relay = ("192.0.2.1", 4340)
    key = os.urandom(32)
    s = Session(KA, IDB, PB, PATH, relay=RelayInfo(relay, key, 0), wall=lambda: 5.0)
    s.start(T0)
    [(first, _)] = [(d, a) for d, a in s.poll(T0) if d[0] == TYPE_RELAY_BIND]
    b1 = RelayBind.parse(first)
    assert b1.cookie == bytes(16) and b1.verify(key)
    cookie = b"\x07" * 16
    assert s.receive(RelayBindAck(PATH, 0, False, b1.counter, cookie).encode(), relay, T0) == []
    [(again, to)] = s.poll(T0)
    b2 = RelayBind.parse(again)
    assert to == relay and b2.cookie == cookie and b2.counter > b1.counter and b2.verify(key)


def test_data_events_are_plain_payloads():
    """Guards the helper the tests above rely on (a broken data_of would make them vacuous)."""
    assert data_of([Data(b"x"), RelayBound(("1.2.3.4", 1))]) == [b"x"]


# --- handshake: the checks behind mac1 ------------------------------------------------------------
def _remac(session_key, peer_pub, msg: bytes) -> bytes:
    """`msg` with a valid mac1 again (after tampering with the body): what only a peer could send."""
    from ntm.handshake import mac1, mac1_key

    return msg[:-16] + mac1(mac1_key(keys.ecdh(session_key, peer_pub), PATH), msg[:-16])


def test_a_peer_built_request_with_a_bad_tag_is_counted_as_auth():
    from tests.test_tunnel import IDA, KB, PA

    a = Session(KA, IDB, PB, PATH, candidates=[ADDR_B])
    b = Session(KB, IDA, PA, PATH, role="wait")
    a.start(T0)
    b.start(T0)
    req = a.poll(T0)[0][0]
    for flip in (1, 2):  # two different tamperings of the sealed part, each with a valid mac1
        b.receive(_remac(KA, PB, req[:-17] + bytes([req[-17] ^ flip]) + req[-16:]), ADDR_A, T0)
    assert b.stats["drop_handshake_auth"] == 2 and b.stats["drop_handshake_mac"] == 0


def test_a_request_with_a_reused_timestamp_is_a_replay_even_with_a_new_ephemeral():
    from ntm.handshake import HandshakeReplayError, Initiator, Responder
    from tests.test_tunnel import IDA, KB, PA

    i, r = Initiator(KA, IDB, PB, PATH), Responder(KB, IDA, PA, PATH)
    r.respond(i.request(T0), T0)
    i.last_timestamp -= 1  # an initiator whose clock went back: same timestamp, fresh ephemeral
    with pytest.raises(HandshakeReplayError, match=f"^Tunnel Request timestamp {r.last_timestamp} is not newer"):
        r.respond(i.request(T0 - 1), T0 + 1)


def test_the_valid_mac1_rate_refusal_and_the_duplicate_memory_are_bounded():
    from ntm.handshake import MAC1_VALID_PER_S, RECENT_MAC1S, HandshakeRateError, Initiator, Responder
    from tests.test_tunnel import IDA, KB, PA

    i, r = Initiator(KA, IDB, PB, PATH), Responder(KB, IDA, PA, PATH)
    for _ in range(int(MAC1_VALID_PER_S[0])):
        try:
            r.respond(i.request(T0), T0)
        except HandshakeRateError:
            pass
    with pytest.raises(HandshakeRateError) as exc:
        r.respond(i.request(T0), T0)
    assert str(exc.value) == "more Tunnel Requests with a valid mac1 than the per-path rate"
    for n in range(RECENT_MAC1S + 50):
        try:
            r.respond(i.request(T0 + 100 + n), T0 + 100 + n)
        except HandshakeRateError:
            pass
    assert len(r._recent) == RECENT_MAC1S


def test_unverified_candidates_get_exactly_the_configured_attempts():
    cfg = TunnelConfig(unverified_attempts=3)
    s = Session(KA, IDB, PB, PATH, candidates=[ADDR_B], unverified=[ADDR_A2], config=cfg)
    s.start(T0)
    sent = [dst for t in range(40) for _, dst in s.poll(T0 + t * 0.25)]
    assert sent.count(ADDR_A2) == 3 and sent.count(ADDR_B) > 3


def test_bind_acks_the_session_cannot_use_are_counted():
    relay = ("192.0.2.1", 4340)
    s = Session(KA, IDB, PB, PATH, relay=RelayInfo(relay, os.urandom(32), 0), wall=lambda: 5.0)
    s.start(T0)
    [(bind, _)] = [(d, a) for d, a in s.poll(T0) if d[0] == TYPE_RELAY_BIND]
    counter = RelayBind.parse(bind).counter
    assert s.receive(RelayBindAck(PATH, 0, False, counter, bytes(16)).encode()[:-1], relay, T0) == []
    assert s.stats["drop_malformed"] == 1  # too short: unparseable
    assert s.receive(RelayBindAck(PATH, 0, False, counter, bytes(16)).encode(), relay, T0) == []
    assert s.stats["drop_malformed"] == 2  # refused with the cookie already sent: no new bind
    assert s.poll(T0) == []

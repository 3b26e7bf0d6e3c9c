"""Tunnel handshake (docs/PROTOCOL.md §6): vectors, identity checks, tampering, replay, paths."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ntm import keys, packet
from ntm.handshake import (
    HANDSHAKE_MIN_INTERVAL,
    MAX_PENDING_ATTEMPTS,
    HandshakeAuthError,
    HandshakeError,
    HandshakeMacError,
    HandshakeRateError,
    MAC1_VALID_PER_S,
    HandshakeReplayError,
    Initiator,
    NoPendingHandshakeError,
    PeerIdentityError,
    Responder,
    UnknownPathError,
    mac1,
    mac1_key,
)
from ntm.packet import REQUEST_LEN, RESPONSE_LEN

A = keys.private_key(bytes([1]) * 32)
B = keys.private_key(bytes([2]) * 32)
C = keys.private_key(bytes([3]) * 32)
PA, PB, PC = (keys.public_bytes(k) for k in (A, B, C))
IDA, IDB, IDC = (keys.node_id(p) for p in (PA, PB, PC))
PATH = bytes.fromhex("0102030405060708")
NOW = 1700000000.0

# The §6 test vector (docs/PROTOCOL.md).
VEC_REQUEST = bytes.fromhex(
    "010102030405060708034f355bdcb7cc0af728ef3cceb9615d90684bb5b2ca5f859ab0f0b704075871aa"
    "5122f53e5c52809239d6e9b32a02276a4290a07edec6200f"
    "a4ea433047dd0e0538c122d4fc3da497"  # mac1
)
VEC_RESPONSE = bytes.fromhex(
    "02010203040506070802466d7fcae563e5cb09a0d1870bb580344804617879a14949cf22285f1bae3f27"
    "df8860a6f54e5da223c9108025729672"
    "743f6d9386b5e0491a3395aed7a68f7f"  # mac1
)
VEC_I2R = bytes.fromhex("52bf7f6219ffc12f2830cc8d008cae3c5e0aaa938588ce5e4c3bd48fc747457d")
VEC_R2I = bytes.fromhex("83ae489ef0f4ca9a1bc358084a2f2e52eea169debca270bc340420123d8a20e7")
VEC_HASH = bytes.fromhex("e40fa8a0d013e2e6e98bf3d3fa49bae0f9908c89583d931ceb93ca725eecac16")
VEC_DATA0 = bytes.fromhex("0301020304050607080000000000000000ac765568341307476ea33da11830d067c5d5106677")


def fixed(byte: int):
    return lambda n: bytes([byte]) * n


def pair(**kw):
    i = Initiator(A, IDB, PB, PATH, rand=kw.get("ri", fixed(0x11)))
    r = Responder(B, IDA, PA, PATH, rand=kw.get("rr", fixed(0x22)))
    return i, r


def test_vector_bytes_and_keys():
    i, r = pair()
    req = i.request(NOW)
    assert req == VEC_REQUEST and len(req) == REQUEST_LEN
    resp, kr = r.respond(req, NOW)
    assert resp == VEC_RESPONSE and len(resp) == RESPONSE_LEN
    ki = i.response(resp)
    assert (ki.send, ki.recv) == (VEC_I2R, VEC_R2I)
    assert (kr.send, kr.recv) == (VEC_R2I, VEC_I2R)
    assert ki.handshake_hash == kr.handshake_hash == VEC_HASH
    assert ki.timestamp == kr.timestamp == 1_700_000_000_000_000_000
    assert ki.initiator and not kr.initiator
    # first DATA packet of the vector: counter 0, payload "hello"
    hdr = struct.pack("!B8sQ", 3, PATH, 0)
    assert hdr + AESGCM(VEC_I2R).encrypt(bytes(4) + hdr[9:], b"hello", hdr) == VEC_DATA0


def _hkdf(salt: bytes, ikm: bytes, info: bytes) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    t1 = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    t2 = hmac.new(prk, t1 + info + b"\x02", hashlib.sha256).digest()
    return t1 + t2


def test_vector_independent_derivation():
    """Re-derive the vector from §6's text with hmac/hashlib only (no ntm.handshake code)."""
    h = ck = hashlib.sha256(b"NTM1_Noise_KK_secp256k1_AESGCM_SHA256").digest()
    mix = lambda h, d: hashlib.sha256(h + d).digest()  # noqa: E731
    h = mix(h, b"NTMobile tunnel v1" + PATH + IDA + IDB)
    h = mix(mix(h, PA), PB)
    ei = keys.private_key(bytes([0x11]) * 32)
    er = keys.private_key(bytes([0x22]) * 32)
    ei_pub, er_pub = ei.public_key.format(), er.public_key.format()
    h = mix(h, ei_pub)
    out = _hkdf(ck, keys.ecdh(ei, PB), b"ntm1 es")
    ck = out[:32]  # noqa: E702
    out = _hkdf(ck, keys.ecdh(A, PB), b"ntm1 ss")
    ck, k = out[:32], out[32:]  # noqa: E702
    c = AESGCM(k).encrypt(bytes(12), struct.pack("!Q", 1_700_000_000_000_000_000), h)
    mac1_key = hashlib.sha256(b"ntm mac1" + keys.ecdh(A, PB) + PATH).digest()
    mac = lambda body: body + hmac.new(mac1_key, body, hashlib.sha256).digest()[:16]  # noqa: E731
    assert mac(bytes([1]) + PATH + ei_pub + c) == VEC_REQUEST
    h = mix(h, c)
    h = mix(h, er_pub)
    out = _hkdf(ck, keys.ecdh(er, ei_pub), b"ntm1 ee")
    ck = out[:32]  # noqa: E702
    out = _hkdf(ck, keys.ecdh(er, PA), b"ntm1 se")
    ck, k = out[:32], out[32:]  # noqa: E702
    c = AESGCM(k).encrypt(bytes(12), b"", h)
    assert mac(bytes([2]) + PATH + er_pub + c) == VEC_RESPONSE
    h = mix(h, c)
    assert h == VEC_HASH
    out = _hkdf(ck, b"", b"ntm1 transport")
    assert (out[:32], out[32:]) == (VEC_I2R, VEC_R2I)


def test_random_handshake_agrees():
    i = Initiator(A, IDB, PB, PATH)
    r = Responder(B, IDA, PA, PATH)
    resp, kr = r.respond(i.request(NOW), NOW)
    ki = i.response(resp)
    assert ki.send == kr.recv and ki.recv == kr.send and ki.send != ki.recv
    assert ki.handshake_hash == kr.handshake_hash


def test_wrong_peer_key_refused_on_both_sides():
    # a DC hands out C's key for B's node ID (and vice versa): both constructors refuse
    with pytest.raises(PeerIdentityError):
        Initiator(A, IDB, PC, PATH)
    with pytest.raises(PeerIdentityError):
        Responder(B, IDA, PC, PATH)
    with pytest.raises(PeerIdentityError):
        Initiator(A, IDB, b"\x04" + bytes(64), PATH)  # not a curve point
    assert issubclass(PeerIdentityError, HandshakeError)


def test_request_from_other_key_refused():
    """C knows B's key and claims to be A: without A's static key the tag does not verify."""
    imposter = Initiator(C, IDB, PB, PATH)
    r = Responder(B, IDA, PA, PATH)
    with pytest.raises(HandshakeMacError):  # mac1 is keyed by the A-B secret: refused before any ECDH
        r.respond(imposter.request(NOW), NOW)
    assert r.last_timestamp == 0
    forged = bytearray(imposter.request(NOW + 1))  # even with a mac1 the A-B key would give,
    forged[-16:] = mac1(mac1_key(keys.ecdh(A, PB), PATH), bytes(forged[:-16]))
    with pytest.raises(HandshakeAuthError):  # the AEAD still needs A's static key
        r.respond(bytes(forged), NOW + 1)


def test_a_forged_request_costs_no_curve_operation(monkeypatch):
    """Issue 11 item 7: what an outsider can send (no mac1 of the path's two nodes) is refused
    after one HMAC: no ECDH, no point decoding; a copy of a genuine Request and Requests beyond
    the valid-mac1 rate are refused before any ECDH too."""
    i, r = pair()
    calls = []
    real_ecdh, real_point = keys.ecdh, packet._check_point
    monkeypatch.setattr(keys, "ecdh", lambda *a: calls.append("ecdh") or real_ecdh(*a))
    monkeypatch.setattr(packet, "_check_point", lambda *a: calls.append("point") or real_point(*a))
    forged = Initiator(C, IDB, PB, PATH).request(NOW)
    calls.clear()  # (the forger's own ECDHs)
    for _ in range(100):
        with pytest.raises(HandshakeMacError):
            r.respond(forged, NOW)
    assert calls == []
    genuine = i.request(NOW)
    r.respond(genuine, NOW)
    calls.clear()
    with pytest.raises(HandshakeReplayError, match="copy"):
        r.respond(genuine, NOW + 1)
    assert calls == []
    burst = int(MAC1_VALID_PER_S[0])
    for n in range(burst - 1):  # the rest of the burst: valid mac1, refused later (interval)
        with pytest.raises(HandshakeRateError):
            r.respond(i.request(NOW), NOW)
    late = i.request(NOW)  # the initiator's own ECDHs happen here
    calls.clear()
    with pytest.raises(HandshakeRateError, match="valid mac1"):
        r.respond(late, NOW)
    assert calls == []


def test_response_from_other_key_refused():
    """C intercepts A's Request to B and answers with its own key: A refuses."""
    i = Initiator(A, IDB, PB, PATH)
    req = i.request(NOW)
    fake = Responder(C, IDA, PA, PATH)  # C pretends to be B (would need B's static key)
    fake._base = Responder(B, IDA, PA, PATH)._base  # even with B's transcript, C lacks B's secret
    with pytest.raises(HandshakeError):
        resp, _ = fake.respond(req, NOW)
        i.response(resp)


@pytest.mark.parametrize("pos", range(REQUEST_LEN))
def test_tampered_request_refused(pos):
    i, r = pair()
    req = bytearray(i.request(NOW))
    req[pos] ^= 0x01
    with pytest.raises(HandshakeError):
        r.respond(bytes(req), NOW)
    # the untouched Request still works afterwards (nothing was stored)
    r2 = Responder(B, IDA, PA, PATH)
    i2 = Initiator(A, IDB, PB, PATH)
    i2.response(r2.respond(i2.request(NOW), NOW)[0])


@pytest.mark.parametrize("pos", range(RESPONSE_LEN))
def test_tampered_response_refused(pos):
    i, r = pair()
    resp, _ = r.respond(i.request(NOW), NOW)
    bad = bytearray(resp)
    bad[pos] ^= 0x01
    with pytest.raises(HandshakeError):
        i.response(bytes(bad))
    assert i.pending
    i.response(resp)  # the genuine one still completes


def test_replayed_request_refused():
    i, r = pair()
    req = i.request(NOW)
    r.respond(req, NOW)
    with pytest.raises(HandshakeReplayError):
        r.respond(req, NOW + 1)
    # an older Request captured earlier is refused too
    i2 = Initiator(A, IDB, PB, PATH)
    old = i2.request(NOW - 5)
    with pytest.raises(HandshakeReplayError):
        r.respond(old, NOW + 2)
    # a fresh one is accepted
    r.respond(i.request(NOW + 3), NOW + 3)


def test_timestamps_strictly_increase_even_with_same_clock():
    i, r = pair()
    a, b = i.request(NOW), i.request(NOW)
    r.respond(a, NOW)
    r.respond(b, NOW + 1)  # same `now`, still newer


def test_rate_limit():
    i, r = pair()
    r.respond(i.request(NOW), NOW)
    with pytest.raises(HandshakeRateError):
        r.respond(i.request(NOW + 0.001), NOW + HANDSHAKE_MIN_INTERVAL / 2)
    r.respond(i.request(NOW + 1), NOW + 1)


def test_unknown_path_refused():
    i = Initiator(A, IDB, PB, b"\xff" * 8)
    r = Responder(B, IDA, PA, PATH)
    with pytest.raises(UnknownPathError):
        r.respond(i.request(NOW), NOW)
    # and a Request re-labelled with our path ID fails mac1 (keyed by the path too) and, re-MAC'd,
    # the AEAD (the path is in the prologue)
    req = bytearray(i.request(NOW + 1))
    req[1:9] = PATH
    with pytest.raises(HandshakeMacError):
        r.respond(bytes(req), NOW + 1)
    req[-16:] = mac1(mac1_key(keys.ecdh(A, PB), PATH), bytes(req[:-16]))
    with pytest.raises(HandshakeAuthError):
        r.respond(bytes(req), NOW + 1)


def test_request_not_for_me_refused():
    """A Request A built for C does not verify at B even though the path matches."""
    i = Initiator(A, IDC, PC, PATH)
    r = Responder(B, IDA, PA, PATH)
    with pytest.raises(HandshakeMacError):
        r.respond(i.request(NOW), NOW)


def test_late_response_to_earlier_attempt_completes():
    i = Initiator(A, IDB, PB, PATH)
    r = Responder(B, IDA, PA, PATH)
    first = i.request(NOW)
    i.request(NOW + 0.25)  # retransmission: a fresh Request
    resp, kr = r.respond(first, NOW + 0.3)  # only the first one arrived
    ki = i.response(resp)
    assert ki.send == kr.recv
    assert not i.pending


def test_pending_attempts_bounded_and_response_without_request():
    i = Initiator(A, IDB, PB, PATH)
    r = Responder(B, IDA, PA, PATH)
    with pytest.raises(NoPendingHandshakeError):
        i.response(r.respond(Initiator(A, IDB, PB, PATH).request(NOW), NOW)[0])
    r = Responder(B, IDA, PA, PATH)
    first = i.request(NOW)
    for k in range(MAX_PENDING_ATTEMPTS):
        i.request(NOW + 1 + k)
    resp, _ = r.respond(first, NOW + 1)  # the initiator no longer remembers that attempt
    with pytest.raises(HandshakeAuthError):
        i.response(resp)


def test_response_replay_refused():
    i, r = pair()
    resp, _ = r.respond(i.request(NOW), NOW)
    i.response(resp)
    with pytest.raises(NoPendingHandshakeError):
        i.response(resp)
    i.request(NOW + 1)
    with pytest.raises(HandshakeAuthError):  # a new attempt: the old Response does not match
        i.response(resp)


def test_malformed_messages():
    i, r = pair()
    for bad in (b"", b"\x01", VEC_REQUEST[:-1], VEC_REQUEST + b"\x00", VEC_RESPONSE):
        with pytest.raises(HandshakeError):
            r.respond(bad, NOW)
    i.request(NOW)
    for bad in (b"", VEC_RESPONSE[:-1], VEC_REQUEST):
        with pytest.raises(HandshakeError):
            i.response(bad)


def test_from_peer_is_true_only_for_the_peers_mac1():
    """Adversary: anyone sending Request-shaped bytes (a flipped mac1, a Request for another path)
    to make a node resend its own Request early (tunnel._resend_on_collision): only a Request whose
    mac1 verifies counts, and asking changes nothing (the Request still answers afterwards)."""
    r = Responder(B, IDA, PA, PATH)
    req = Initiator(A, IDB, PB, PATH).request(NOW)
    assert r.from_peer(req)
    assert not r.from_peer(req[:-1] + bytes([req[-1] ^ 1]))
    assert not r.from_peer(Initiator(A, IDB, PB, b"\x09" * 8).request(NOW))
    assert not r.from_peer(req[:-1])
    r.respond(req, NOW)


def test_a_refused_request_says_what_was_wrong_with_it():
    """The drop counters and the debug log name why a Request was refused: too short, or for
    another path (and which)."""
    r = Responder(B, IDA, PA, PATH)
    with pytest.raises(HandshakeError, match="^malformed Tunnel Request: "):
        r.respond(Initiator(A, IDB, PB, PATH).request(NOW)[:-1], NOW)
    other = b"\x09" * 8
    with pytest.raises(UnknownPathError, match=f"^Tunnel Request for path {other.hex()}, expected {PATH.hex()}$"):
        r.respond(Initiator(A, IDB, PB, other).request(NOW), NOW)
    # the peer itself (the only other holder of the mac1 key) sending an ephemeral key off the curve
    req = Initiator(A, IDB, PB, PATH).request(NOW)
    body = req[:9] + b"\x02" + b"\xff" * 32 + req[42:-16]
    bad = body + mac1(mac1_key(keys.ecdh(A, PB), PATH), body)
    with pytest.raises(HandshakeError, match="^malformed Tunnel Request: "):
        r.respond(bad, NOW + 1)

"""The security core's edges, exactly: every refusal with its code and message (what an operator
reads), every boundary on the right side, and the byte-exact encodings other parties recompute.
Written to leave no mutant of these modules alive that changes behaviour (`make mutate`)."""

from __future__ import annotations

import os
import re

import pytest

from ntm import envelope, keys, messages, record
from ntm.errors import ParseError, SignatureError
from ntm.registration import RegistrationError, RegistrationRequest, check_request, parse_request

KEY = keys.private_key(bytes([1]) * 32)
NODE = keys.node_id_of(KEY)
DC = b"\x22" * 20
DOMAIN = record.Domain(31337, b"\x5f" * 20)
NOW_MS = 1_700_000_000_000
OTHER_DC = b"\x33" * 20


def raises(exc_type, message: str):
    """pytest.raises that insists on the whole message, not a fragment."""
    return pytest.raises(exc_type, match="^" + re.escape(message) + "$")


# --- keys ----------------------------------------------------------------------------------------
def test_key_encodings_are_the_ethereum_ones():
    pub = keys.public_bytes(KEY)
    assert len(pub) == 65 and pub[0] == 4
    assert keys.node_id(pub) == keys.node_id(keys.parse_public(pub)) == NODE
    assert keys.checksum(NODE) == "0x1a642f0E3c3aF545E7AcBD38b07251B3990914F1"


@pytest.mark.parametrize(
    "text",
    [
        "0x1a642f0e3c3af545e7acbd38b07251b3990914f1",
        "0X1A642F0E3C3AF545E7ACBD38B07251B3990914F1",
        "1a642f0e3c3af545e7acbd38b07251b3990914f1",
    ],
)
def test_node_ids_parse_in_any_case_with_or_without_0x(text):
    assert keys.parse_node_id(text) == NODE


@pytest.mark.parametrize(
    "text, message",
    [
        ("0xzz", "node ID '0xzz' is not hex"),
        ("0x" + "00" * 19, "node ID '0x" + "00" * 19 + "' is 19 bytes, expected 20"),
        ("0x00" + "00" * 20, "node ID '0x00" + "00" * 20 + "' is 21 bytes, expected 20"),
    ],
)
def test_bad_node_ids_say_what_is_wrong(text, message):
    with raises(ValueError, message):
        keys.parse_node_id(text)


def test_bad_public_key_bytes_are_refused():
    with pytest.raises(SignatureError, match="^not a secp256k1 public key: "):
        keys.parse_public(b"\x04" + b"\x00" * 64)


def _sig(r: int, s: int, v: int = 27) -> bytes:
    return r.to_bytes(32) + s.to_bytes(32) + bytes([v])


@pytest.mark.parametrize(
    "sig, message",
    [
        (b"\x00" * 64, "signature is 64 bytes, expected 65"),
        (_sig(1, 1, 26), "signature v is 26, expected 27 or 28"),
        (_sig(0, 5), "signature r or s out of range"),
        (_sig(5, 0), "signature r or s out of range"),
        (_sig(keys.SECP256K1_N, 5), "signature r or s out of range"),
        (_sig(5, keys.SECP256K1_N), "signature r or s out of range"),
        (_sig(5, keys.HALF_N + 1), "signature has high s (malleable form refused)"),
    ],
)
def test_signature_refusals(sig, message):
    with raises(SignatureError, message):
        keys.recover(os.urandom(32), sig)


def test_signature_range_boundaries_are_inclusive_where_the_contract_is():
    """r = 1, s = 1 and s = n/2 are in range and low-s: they fail (if at all) only at recovery."""
    digest = b"\x07" * 32
    for r, s in ((1, 1), (1, keys.HALF_N), (keys.SECP256K1_N - 1, 1)):
        try:
            keys.recover(digest, _sig(r, s))
        except SignatureError as exc:
            assert str(exc).startswith("signature does not recover"), (r, s, exc)


def test_recovery_finds_the_signer_for_both_v():
    for i in range(8):  # both parities of the recovery id turn up within a few digests
        digest = bytes([i]) * 32
        sig = keys.sign_digest(KEY, digest)
        assert keys.recover_node_id(digest, sig) == NODE
        flipped = sig[:64] + bytes([55 - sig[64]])  # the other v: another key, never the signer
        try:
            assert keys.recover_node_id(digest, flipped) != NODE
        except SignatureError:
            pass


def test_ecdh_is_symmetric_and_key_specific():
    other = keys.generate()
    shared = keys.ecdh(KEY, keys.public_bytes(other))
    assert shared == keys.ecdh(other, keys.public_bytes(KEY)) and len(shared) == 32
    assert shared != keys.ecdh(keys.generate(), keys.public_bytes(other))


# --- record --------------------------------------------------------------------------------------
def test_next_timestamp_is_now_but_always_newer():
    assert record.next_timestamp(NOW_MS, NOW_MS - 10) == NOW_MS
    assert record.next_timestamp(NOW_MS, NOW_MS) == NOW_MS + 1
    assert record.next_timestamp(NOW_MS, NOW_MS + 5) == NOW_MS + 6


@pytest.mark.parametrize(
    "node, dc, ts, message",
    [
        (NODE[:19], DC, 1, "node and dc must be 20-byte addresses"),
        (NODE, DC[:19], 1, "node and dc must be 20-byte addresses"),
        (NODE, DC, -1, "timestamp must fit in uint64"),
        (NODE, DC, record.UINT64_MAX + 1, "timestamp must fit in uint64"),
    ],
)
def test_records_out_of_the_contract_types_are_refused(node, dc, ts, message):
    with raises(ValueError, message):
        record.NodeTransaction(node, dc, ts)


def test_record_timestamp_boundaries_are_valid():
    for ts in (0, record.UINT64_MAX):
        rec = record.NodeTransaction(NODE, DC, ts)
        rec.verify(rec.sign(KEY, DOMAIN), DOMAIN)


def test_record_json_and_compact_signature():
    rec = record.NodeTransaction(NODE, DC, NOW_MS, True)
    assert rec.to_json() == {"node": keys.checksum(NODE), "dc": keys.checksum(DC), "timestamp": NOW_MS, "revoked": True}
    sig = rec.sign(KEY, DOMAIN)
    r, vs = record.to_compact(sig)
    assert r == sig[:32] and len(vs) == 32
    assert int.from_bytes(vs) == (sig[64] - 27) << 255 | int.from_bytes(sig[32:64])
    with raises(SignatureError, "record is not signed by its node"):
        rec.verify(keys.sign_digest(keys.generate(), rec.digest(DOMAIN)), DOMAIN)


def test_compact_form_of_both_parities_and_refusals():
    s = 12345
    assert record.to_compact(_sig(7, s, 27)) == ((7).to_bytes(32), s.to_bytes(32))
    assert record.to_compact(_sig(7, s, 28)) == ((7).to_bytes(32), ((1 << 255) | s).to_bytes(32))
    with raises(SignatureError, "signature must be 65 bytes"):
        record.to_compact(b"\x00" * 66)
    for v in (26, 29):
        with raises(SignatureError, "signature v must be 27 or 28"):
            record.to_compact(_sig(7, s, v))


def test_record_fields_change_the_digest():
    base = record.NodeTransaction(NODE, DC, NOW_MS)
    others = [
        record.NodeTransaction(DC, DC, NOW_MS),
        record.NodeTransaction(NODE, NODE, NOW_MS),
        record.NodeTransaction(NODE, DC, NOW_MS + 1),
        record.NodeTransaction(NODE, DC, NOW_MS, True),
    ]
    digests = {r.digest(DOMAIN) for r in [base, *others]}
    digests |= {base.digest(record.Domain(1, DOMAIN.registry)), base.digest(record.Domain(31337, DC))}
    assert len(digests) == 7


# --- registration --------------------------------------------------------------------------------
INFO = messages.DcInfoReply(keys.checksum(DC), "dc1", DOMAIN.chain_id, keys.checksum(DOMAIN.registry), [1, 2], [], True)


def test_signed_request_carries_exactly_what_was_asked():
    req = RegistrationRequest.signed(KEY, INFO, NOW_MS, ["10.0.0.1:4330"])
    assert req.record == record.NodeTransaction(NODE, DC, NOW_MS, False)
    assert req.pubkey == keys.public_bytes(KEY) and req.local_addrs == ("10.0.0.1:4330",)
    req.record.verify(req.signature, DOMAIN)
    revoke = RegistrationRequest.signed(KEY, INFO, NOW_MS + 1, revoked=True)
    assert revoke.record.revoked and revoke.local_addrs == ()
    parsed, wait = parse_request(revoke.to_json())
    assert parsed == revoke and not wait


def _check(req, dc=DC, latest=0, revoked=False, now=NOW_MS):
    check_request(req, dc, DOMAIN, now, latest, revoked)


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("pubkey", "bad_pubkey", "public key does not hash to the record's node ID"),
        ("not_a_point", "bad_pubkey", "public key is not a secp256k1 point"),
        ("dc", "wrong_dc", f"record names DC {keys.checksum(DC)}, this DC is {keys.checksum(OTHER_DC)}"),
        ("sig", "bad_signature", "bad signature: record is not signed by its node"),
        ("revoked", "revoked", "node is revoked; a revoked node ID can never register again"),
        ("stale", "stale", f"record timestamp {NOW_MS} is not newer than {NOW_MS} (replay?)"),
        ("future", "future", "record timestamp is too far in the future (check the clock)"),
    ],
)
def test_registration_refusals_say_why(case, code, message):
    req = RegistrationRequest.signed(KEY, INFO, NOW_MS)
    kw = {}
    if case == "pubkey":
        req = RegistrationRequest(req.record, req.signature, keys.public_bytes(keys.generate()), ())
    elif case == "not_a_point":
        req = RegistrationRequest(req.record, req.signature, b"\x04" + b"\x00" * 64, ())
    elif case == "dc":
        kw["dc"] = OTHER_DC
    elif case == "sig":
        req = RegistrationRequest(req.record, keys.sign_digest(keys.generate(), os.urandom(32)), req.pubkey, ())
    elif case == "revoked":
        kw["revoked"] = True
    elif case == "stale":
        kw["latest"] = NOW_MS
    elif case == "future":
        kw["now"] = NOW_MS - record.DC_ACCEPT_FUTURE_MS - 1
    with raises(RegistrationError, message) as exc:
        _check(req, **kw)
    assert exc.value.code == code


def test_registration_boundaries_accept():
    req = RegistrationRequest.signed(KEY, INFO, NOW_MS)
    _check(req, latest=NOW_MS - 1)  # just newer
    _check(req, now=NOW_MS - record.DC_ACCEPT_FUTURE_MS)  # exactly at the future edge


# --- envelopes -----------------------------------------------------------------------------------
DC_KEY = keys.generate()
DC_ID = keys.node_id_of(DC_KEY)


def test_canonical_json_vector():
    """What every DC signs: sorted keys, no spaces, UTF-8 (not \\u escapes)."""
    assert (
        envelope.canonical({"b": [1, {"d": 2, "c": "é"}], "a": None}) == '{"a":null,"b":[1,{"c":"é","d":2}]}'.encode()
    )


def test_envelope_vector():
    env = envelope.seal(KEY, "k", {"x": 1}, NOW_MS, nonce=bytes(16))
    assert {k: env[k] for k in ("kind", "from", "ts", "nonce", "body")} == {
        "kind": "k",
        "from": keys.checksum(NODE),
        "ts": NOW_MS,
        "nonce": "00" * 16,
        "body": {"x": 1},
    }
    parsed, sig = envelope.parse(env)
    assert parsed.digest() == keys.keccak(envelope.DOMAIN_TAG + envelope.canonical(parsed.signed_part()))
    assert keys.recover_node_id(parsed.digest(), sig) == NODE and sig.hex() == env["sig"]


GOOD = envelope.seal(DC_KEY, "k", {"x": 1}, NOW_MS)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: {**e, "extra": 1}, "envelope must have exactly kind, from, ts, nonce, body, sig"),
        (
            lambda e: {k: v for k, v in e.items() if k != "sig"},
            "envelope must have exactly kind, from, ts, nonce, body, sig",
        ),
        (lambda e: {**e, "kind": 5}, "kind must be a string and body an object"),
        (lambda e: {**e, "body": []}, "kind must be a string and body an object"),
        (lambda e: {**e, "ts": "1"}, "ts must be an integer"),
        (lambda e: {**e, "ts": True}, "ts must be an integer"),
        (lambda e: {**e, "nonce": "00" * 15}, "nonce must be 16 bytes"),
    ],
)
def test_malformed_envelopes_say_what_is_wrong(mutate, message):
    with raises(ParseError, "malformed envelope: " + message):
        envelope.parse(mutate(GOOD))
    with raises(ParseError, "malformed envelope: envelope must have exactly kind, from, ts, nonce, body, sig"):
        envelope.parse([])


def test_envelope_refusals_in_order():
    trusted = lambda a: a == DC_ID  # noqa: E731
    with raises(ParseError, "expected a 'other' envelope, got 'k'"):
        envelope.open_envelope(GOOD, "other", NOW_MS, trusted)
    forged = {**GOOD, "body": {"x": 2}}
    with raises(SignatureError, "envelope signature does not match its sender"):
        envelope.open_envelope(forged, "k", NOW_MS, trusted)
    with raises(SignatureError, f"{keys.checksum(DC_ID)} is not an active DC"):
        envelope.open_envelope(GOOD, "k", NOW_MS, lambda a: False)
    with raises(SignatureError, "envelope timestamp outside the freshness window"):
        envelope.open_envelope(GOOD, "k", NOW_MS + envelope.MAX_SKEW_MS + 1, trusted)
    guard = envelope.ReplayGuard()
    assert envelope.open_envelope(GOOD, "k", NOW_MS, trusted, guard).body == {"x": 1}
    with raises(SignatureError, "envelope replayed"):
        envelope.open_envelope(GOOD, "k", NOW_MS, trusted, guard)


def test_replay_guard_remembers_each_sender_nonce_pair_and_stays_bounded():
    guard = envelope.ReplayGuard(size=2)
    a, b = envelope.Envelope("k", DC_ID, NOW_MS, bytes(16), {}), envelope.Envelope("k", NODE, NOW_MS, bytes(16), {})
    guard.check_and_add(a, NOW_MS)
    guard.check_and_add(b, NOW_MS)  # same nonce, other sender: a different envelope
    c = envelope.Envelope("k", DC_ID, NOW_MS, b"\x01" * 16, {})
    guard.check_and_add(c, NOW_MS)  # over the size: the oldest (a) is forgotten, b and c kept
    guard.check_and_add(a, NOW_MS)
    for e in (c, a):
        with raises(SignatureError, "envelope replayed"):
            guard.check_and_add(e, NOW_MS)
    # an entry exactly two windows old is still remembered; one millisecond more and it goes
    old = envelope.ReplayGuard()
    old.check_and_add(a, NOW_MS)
    with raises(SignatureError, "envelope replayed"):
        old.check_and_add(a, NOW_MS + 2 * envelope.MAX_SKEW_MS)
    old.check_and_add(a, NOW_MS + 2 * envelope.MAX_SKEW_MS + 1)


# --- handshake -----------------------------------------------------------------------------------
from ntm import handshake  # noqa: E402
from ntm.handshake import (  # noqa: E402
    HANDSHAKE_MIN_INTERVAL,
    HandshakeAuthError,
    HandshakeError,
    HandshakeMacError,
    HandshakeRateError,
    HandshakeReplayError,
    Initiator,
    NoPendingHandshakeError,
    PeerIdentityError,
    Responder,
    UnknownPathError,
    mac1,
    mac1_key,
)

KB = keys.generate()
PATH = b"\x01" * 8


def _pair(path: bytes = PATH) -> tuple[Initiator, Responder]:
    return (
        Initiator(KEY, keys.node_id_of(KB), keys.public_bytes(KB), path),
        Responder(KB, NODE, keys.public_bytes(KEY), path),
    )


def test_request_timestamp_is_the_wall_clock_and_always_grows():
    i, r = _pair()
    r.respond(i.request(5.0, wall=1_700_000_000.0), 5.0)
    assert r.last_timestamp == 1_700_000_000_000_000_000 and i.sent_at() == 5.0
    r.respond(i.request(6.0, wall=1_700_000_000.0), 6.0)  # same wall time (or a clock step back)
    assert r.last_timestamp == 1_700_000_000_000_000_001
    r.respond(i.request(7.0), 7.0)  # no wall clock given: `now` is the timestamp
    assert r.last_timestamp == 1_700_000_000_000_000_002  # still newer than the last one
    i2, r2 = _pair()
    r2.respond(i2.request(1.0, wall=9.3e9), 1.0)  # year 2264: the u64 of nanoseconds still fits
    assert r2.last_timestamp == 9_300_000_000_000_000_000


def test_keys_name_their_side_and_sent_at_is_the_oldest_outstanding_request():
    i, r = _pair()
    assert i.sent_at() is None
    req = i.request(1.0)
    i.request(1.5)
    assert i.sent_at() == 1.0
    resp, kr = r.respond(req, 2.0)
    ki = i.response(resp)
    assert ki.initiator is True and kr.initiator is False
    assert (ki.send, ki.recv) == (kr.recv, kr.send) and ki.timestamp == kr.timestamp
    assert i.sent_at() is None


def test_handshake_refusals_say_why():
    i, r = _pair()
    req = i.request(1.0)
    with raises(UnknownPathError, f"Tunnel Request for path {PATH.hex()}, expected {'02' * 8}"):
        _pair(b"\x02" * 8)[1].respond(req, 1.0)
    with pytest.raises(HandshakeError, match="^malformed Tunnel Request: "):
        r.respond(req[:-1], 1.0)
    with raises(HandshakeMacError, "Tunnel Request mac1 does not verify"):
        r.respond(req[:-1] + bytes([req[-1] ^ 1]), 1.0)
    key = mac1_key(keys.ecdh(r.static_key, r.peer_pub), PATH)
    remac = lambda m: m[:-16] + mac1(key, m[:-16])  # noqa: E731 - a tampered body with a valid mac1
    with raises(HandshakeAuthError, "Tunnel Request failed authentication (tampered, or not from the expected peer)"):
        r.respond(remac(req[:-17] + bytes([req[-17] ^ 1]) + req[-16:]), 1.0)
    resp, _ = r.respond(req, 1.0)
    with raises(HandshakeReplayError, "a copy of a recent Tunnel Request"):
        r.respond(req, 2.0)
    with raises(HandshakeRateError, "Tunnel Requests arriving faster than the per-path limit"):
        r.respond(i.request(1.0 + HANDSHAKE_MIN_INTERVAL / 2), 1.0 + HANDSHAKE_MIN_INTERVAL / 2)
    with raises(HandshakeRateError, "Tunnel Requests arriving faster than the per-path limit"):
        r.respond(i.request(1.0), 1.0)  # at the same instant
    r.respond(i.request(1.0 + HANDSHAKE_MIN_INTERVAL), 1.0 + HANDSHAKE_MIN_INTERVAL)  # exactly the limit: fine
    with raises(HandshakeMacError, "Tunnel Response mac1 does not verify"):
        i.response(resp[:-1] + bytes([resp[-1] ^ 1]))
    with raises(HandshakeAuthError, "Tunnel Response failed authentication (tampered, or wrong responder key)"):
        i.response(remac(resp[:-17] + bytes([resp[-17] ^ 1]) + resp[-16:]))
    with raises(UnknownPathError, f"Tunnel Response for path {PATH.hex()}, expected {'02' * 8}"):
        _pair(b"\x02" * 8)[0].response(resp)
    fresh, _ = _pair()
    with raises(NoPendingHandshakeError, "Tunnel Response but no Request outstanding"):
        fresh.response(resp)


def test_peer_identity_and_path_checks():
    with raises(PeerIdentityError, f"peer key belongs to {keys.checksum(NODE)}, expected {keys.checksum(DC)}"):
        Initiator(KB, DC, keys.public_bytes(KEY), PATH)
    with pytest.raises(PeerIdentityError, match="^peer public key is invalid: not a secp256k1 public key"):
        Initiator(KB, DC, b"\x04" + b"\x00" * 64, PATH)
    with raises(ValueError, "path ID must be 8 bytes"):
        Initiator(KEY, keys.node_id_of(KB), keys.public_bytes(KB), b"\x01" * 7)


def test_an_ephemeral_key_is_drawn_again_when_the_randomness_is_not_a_scalar():
    draws = iter([b"\x00" * 32, b"\xff" * 32, b"\x05" * 32])
    assert handshake._ephemeral(lambda n: next(draws)).secret == b"\x05" * 32


def test_the_transcript_copy_is_independent():
    st = handshake.initial_state(PATH, NODE, keys.public_bytes(KEY), DC, keys.public_bytes(KB))
    branch = st.copy()
    branch.mix_hash(b"x")
    assert (branch.ck, st.h != branch.h) == (st.ck, True)
    with raises(HandshakeAuthError, "handshake message failed authentication"):
        branch.mix_key(b"\x01" * 32, b"t")
        branch.decrypt_and_hash(b"\x00" * 16)


# --- relay table ---------------------------------------------------------------------------------
from rs.relay import MAX_LIFETIME_S, MAX_PATH_BYTES, PathError, RelayTable  # noqa: E402
from ntm.packet import NO_COOKIE, RelayBind, RelayBindAck, TransportPacket, TYPE_DATA, relay_side_key  # noqa: E402

TOKEN = b"\x0b" * 32
A, B, C = ("198.18.0.1", 1), ("198.18.0.2", 2), ("198.18.0.3", 3)


def test_relay_table_accounts_for_everything_exactly():
    t = RelayTable(max_paths=2, idle_s=30.0)
    path, created = t.add_path(PATH, TOKEN, 100.0, 1000, 0.0, owner=DC, nodes=(NODE, DC))
    assert created and (path.created, path.nodes, path.last_active) == (0.0, (NODE, DC), 0.0)
    assert [(e.kind, e.path_id) for e in t.pop_events()] == [("added", PATH)] and t.paths_added == 1
    counter = iter(range(1, 100))

    def bind(side: int, addr, now: float) -> list:  # the two-step bind: cookie, then proof
        key = relay_side_key(TOKEN, side)
        out = t.on_datagram(RelayBind.make(PATH, side, next(counter), NO_COOKIE, key).encode(), addr, now)
        cookie = RelayBindAck.parse(out[0][0]).cookie
        assert cookie == t.cookie(PATH, side, addr) and not RelayBindAck.parse(out[0][0]).bound
        return t.on_datagram(RelayBind.make(PATH, side, next(counter), cookie, key).encode(), addr, now)

    def ack(side: int, addr, n: int) -> list:
        return [(RelayBindAck(PATH, side, True, n, t.cookie(PATH, side, addr)).encode(), addr)]

    assert bind(0, A, 1.0) == ack(0, A, 2)
    assert bind(1, B, 1.0) == ack(1, B, 4)
    assert bind(1, C, 2.0) == ack(1, C, 6)  # side 1 roamed
    assert [(e.kind, e.path_id, e.side, e.addr) for e in t.pop_events()] == [
        ("bound", PATH, 0, A),
        ("bound", PATH, 1, B),
        ("moved", PATH, 1, C),
    ]
    assert (t.binds, path.binds, t.bound_paths()) == (3, 3, 1)
    pkt = TransportPacket(TYPE_DATA, PATH, 1, b"\x00" * 100).encode()
    assert t.on_datagram(pkt, A, 3.0) == [(pkt, C)] and t.on_datagram(pkt, C, 3.0) == [(pkt, A)]
    assert (t.forwarded_packets, t.forwarded_bytes) == (2, 2 * len(pkt))
    assert path.stats() == {
        "path": PATH.hex(),
        "bound": [True, True],
        "bytes": [len(pkt), len(pkt)],
        "packets": [1, 1],
        "binds": 3,
        "max_bytes": 1000,
    }
    assert path.last_active == 3.0
    # the budget: what fits is forwarded, the packet that would pass it removes the path
    rest = 1000 - 2 * len(pkt)
    exact = TransportPacket(TYPE_DATA, PATH, 2, b"\x00" * (rest - (len(pkt) - 100))).encode()
    assert len(exact) == rest and t.on_datagram(exact, A, 4.0) == [(exact, C)]
    assert t.on_datagram(pkt, A, 4.0) == [] and PATH not in t.paths
    assert t.dropped == {"byte_cap": 1} and t.removed == {"byte_cap": 1}
    assert [(e.kind, e.path_id, e.reason) for e in t.pop_events()] == [("removed", PATH, "byte_cap")]


def test_relay_path_limits_and_refusals():
    t = RelayTable(max_paths=1, idle_s=30.0)
    with raises(ValueError, "path ID must be 8 bytes and token 32 bytes"):
        t.add_path(PATH[:7], TOKEN, 10.0, 1, 0.0)
    with raises(ValueError, "path must have a positive byte budget and expire in the future"):
        t.add_path(PATH, TOKEN, 10.0, 0, 0.0)
    with raises(ValueError, "path must have a positive byte budget and expire in the future"):
        t.add_path(PATH, TOKEN, 0.0, 1, 0.0)
    path, _ = t.add_path(PATH, TOKEN, 1e12, 1 << 62, 0.0, owner=DC)
    assert (path.expires_at, path.max_bytes) == (MAX_LIFETIME_S, MAX_PATH_BYTES)
    assert t.add_path(PATH, TOKEN, 10.0, 1, 1.0, owner=DC) == (path, False)  # smaller asks change nothing
    with raises(PathError, f"path {PATH.hex()} exists with another token"):
        t.add_path(PATH, b"\x0c" * 32, 10.0, 1, 1.0, owner=DC)
    with raises(PathError, f"path {PATH.hex()} exists with another token"):
        t.add_path(PATH, TOKEN, 10.0, 1, 1.0, owner=NODE)
    with raises(PathError, "relay table is full (1 paths)") as full:
        t.add_path(b"\x02" * 8, TOKEN, 10.0, 1, 1.0)
    assert full.value.code == "full"


def test_relay_expiry_reasons():
    t = RelayTable(idle_s=30.0)
    t.add_path(PATH, TOKEN, 100.0, 10, 0.0)
    t.add_path(b"\x02" * 8, TOKEN, 20.0, 10, 0.0)
    assert t.expire(19.9) == 0 and t.expire(20.0) == 1 and t.removed == {"lifetime": 1}
    assert t.expire(30.0) == 1 and t.removed == {"lifetime": 1, "unbound": 1}  # nobody ever bound it
    key = relay_side_key(TOKEN, 0)
    bind = lambda n, cookie=NO_COOKIE: RelayBind.make(PATH, 0, n, cookie, key).encode()  # noqa: E731
    t.add_path(PATH, TOKEN, 50.0, 10, 40.0)
    assert t.on_datagram(bind(1), A, 50.0) == []  # lifetime over at 50
    assert t.removed["lifetime"] == 2 and t.dropped == {"expired": 1}
    t.add_path(PATH, TOKEN, 500.0, 10, 100.0)
    t.on_datagram(bind(2, t.cookie(PATH, 0, A)), A, 100.0)  # bound at 100, then silent
    assert t.on_datagram(bind(3), A, 130.0) == []  # idle since 100
    assert t.removed == {"lifetime": 2, "unbound": 1, "idle": 1} and t.dropped == {"expired": 2}


def test_relay_counts_paths_and_bound_pairs_and_bounds_its_event_log():
    t = RelayTable()
    for i in range(3):
        t.add_path(bytes([i]) * 8, TOKEN, 100.0, 10, 0.0)
    assert t.paths_added == 3 and t.bound_paths() == 0
    n = iter(range(1, 1 << 20))

    def bind(path: bytes, side: int, addr, now: float) -> None:  # with the cookie of `addr`: binds
        key = relay_side_key(TOKEN, side)
        t.on_datagram(RelayBind.make(path, side, next(n), t.cookie(path, side, addr), key).encode(), addr, now)

    bind(b"\x00" * 8, 0, A, 1.0)  # one side of path 0
    bind(b"\x01" * 8, 1, B, 1.0)  # the other side of path 1
    assert t.bound_paths() == 0
    bind(b"\x00" * 8, 1, B, 1.0)
    assert t.bound_paths() == 1
    for i in range(10_100):  # side 0 of path 2 moving to a new address each time: an event each
        bind(b"\x02" * 8, 0, (A[0], 1000 + i), 2.0)
    assert len(t.events) == 10_000  # a relay that is never drained does not grow without bound


def test_replay_guard_forgets_the_oldest_first():
    guard = envelope.ReplayGuard()
    old, new = (envelope.Envelope("k", DC_ID, NOW_MS, bytes([i]) * 16, {}) for i in (1, 2))
    guard.check_and_add(old, NOW_MS)
    guard.check_and_add(new, NOW_MS + envelope.MAX_SKEW_MS)
    guard.check_and_add(envelope.Envelope("k", DC_ID, NOW_MS, b"\x03" * 16, {}), NOW_MS + 2 * envelope.MAX_SKEW_MS + 1)
    guard.check_and_add(old, NOW_MS + 2 * envelope.MAX_SKEW_MS + 1)  # expired: forgotten
    with raises(SignatureError, "envelope replayed"):
        guard.check_and_add(new, NOW_MS + 2 * envelope.MAX_SKEW_MS + 1)  # not yet: remembered


def test_the_handshake_rate_limit_boundary_is_exact():
    i, r = _pair()
    r.respond(i.request(0.0), 0.0)
    r.respond(i.request(0.02), 0.02)  # exactly HANDSHAKE_MIN_INTERVAL later: accepted
    assert HANDSHAKE_MIN_INTERVAL == 0.02


def test_checksum_of_a_mutable_buffer_is_the_same_and_not_cached():
    """A node ID held in a bytearray or memoryview (a parser's buffer) checksums like its bytes;
    it cannot be a cache key (unhashable, and it may change), so it bypasses the cache."""
    nid = bytes(range(20))
    assert keys.checksum(bytearray(nid)) == keys.checksum(memoryview(nid)) == keys.checksum(nid)

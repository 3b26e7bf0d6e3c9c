"""Sans-I/O core: keys, registration checks, DC envelopes, keepalives. Negative cases first."""

import pytest
from hypothesis import given, strategies as st

from daemon import keystore
from ntm import envelope, keepalive, keys, session_auth
from ntm.errors import KeystoreError, ParseError, SignatureError
from ntm.record import DC_ACCEPT_FUTURE_MS, Domain, NodeTransaction
from ntm.registration import RegistrationError, RegistrationRequest, check_request, parse_request

DOMAIN = Domain(31337, b"\x11" * 20)
DC = b"\x22" * 20
NOW = 1_800_000_000_000


def signed(key, ts=NOW, dc=DC, revoked=False, domain=DOMAIN):
    rec = NodeTransaction(keys.node_id_of(key), dc, ts, revoked)
    return RegistrationRequest(rec, rec.sign(key, domain), keys.public_bytes(key), ("10.0.0.1:4330",))


def high_s(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (keys.SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])


def test_high_s_twin_is_refused_though_it_recovers_the_same_key():
    key = keys.generate()
    digest = b"\x05" * 32
    sig = keys.sign_digest(key, digest)
    assert keys.recover_node_id(digest, sig) == keys.node_id_of(key)
    with pytest.raises(SignatureError, match="high s"):
        keys.recover(digest, high_s(sig))


@pytest.mark.parametrize("bad", [b"", b"\0" * 65, b"\1" * 64 + b"\x1d", b"\1" * 66])
def test_malformed_signatures_are_refused(bad):
    with pytest.raises(SignatureError):
        keys.recover(b"\x05" * 32, bad)


def test_keystore_roundtrip_and_wrong_passphrase(tmp_path):
    key = keys.generate()
    keystore.save_keystore(key, tmp_path / "k.json", "secret")
    assert (tmp_path / "k.json").stat().st_mode & 0o777 == 0o600
    assert keystore.load_keystore(tmp_path / "k.json", "secret").secret == key.secret
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        keystore.load_keystore(tmp_path / "k.json", "nope")
    with pytest.raises(KeystoreError, match="no key file"):
        keystore.load_keystore(tmp_path / "missing.json")


def test_ecdh_is_symmetric():
    a, b = keys.generate(), keys.generate()
    assert keys.ecdh(a, keys.public_bytes(b)) == keys.ecdh(b, keys.public_bytes(a))


class TestRegistrationCheck:
    key = keys.generate()

    def check(self, req, latest=0, revoked=False):
        check_request(req, DC, DOMAIN, NOW, latest, revoked)

    def test_good_request_passes(self):
        self.check(signed(self.key))

    @pytest.mark.parametrize(
        "code,make",
        [
            ("bad_signature", lambda k: signed(k, domain=Domain(1, b"\x11" * 20))),
            ("bad_signature", lambda k: signed(k, domain=Domain(31337, b"\x12" * 20))),
            ("wrong_dc", lambda k: signed(k, dc=b"\x33" * 20)),
            ("future", lambda k: signed(k, ts=NOW + DC_ACCEPT_FUTURE_MS + 1)),
        ],
    )
    def test_refusals(self, code, make):
        with pytest.raises(RegistrationError) as exc:
            self.check(make(self.key))
        assert exc.value.code == code

    def test_signature_by_another_key(self):
        req = signed(self.key)
        forged = RegistrationRequest(req.record, signed(keys.generate()).signature, req.pubkey, ())
        with pytest.raises(RegistrationError, match="bad signature"):
            self.check(forged)

    def test_high_s_signature(self):
        req = signed(self.key)
        with pytest.raises(RegistrationError, match="high s"):
            self.check(RegistrationRequest(req.record, high_s(req.signature), req.pubkey, ()))

    def test_pubkey_of_another_node(self):
        req = signed(self.key)
        with pytest.raises(RegistrationError, match="public key"):
            self.check(RegistrationRequest(req.record, req.signature, keys.public_bytes(keys.generate()), ()))

    def test_replay_and_revoked(self):
        with pytest.raises(RegistrationError, match="not newer"):
            self.check(signed(self.key), latest=NOW)
        with pytest.raises(RegistrationError, match="revoked"):
            self.check(signed(self.key), latest=1, revoked=True)

    def test_parse_roundtrip_and_errors(self):
        req = signed(self.key)
        assert parse_request(req.to_json()) == (req, False)
        assert parse_request({**req.to_json(), "wait": "confirmed"}) == (req, True)
        for bad in (
            [],
            {"record": {}},
            {**req.to_json(), "local_addrs": ["nothost:1"]},
            {**req.to_json(), "local_addrs": ["1.2.3.4:5"] * 9},
            {**req.to_json(), "signature": "zz"},
        ):
            with pytest.raises(ParseError):
                parse_request(bad)


class TestEnvelope:
    dc_key = keys.generate()
    trusted = staticmethod(lambda addr: addr == keys.node_id_of(TestEnvelope.dc_key))

    def test_roundtrip(self):
        env = envelope.seal(self.dc_key, "k", {"x": 1}, NOW)
        assert envelope.open_envelope(env, "k", NOW, self.trusted).body == {"x": 1}

    def test_untrusted_sender(self):
        env = envelope.seal(keys.generate(), "k", {"x": 1}, NOW)
        with pytest.raises(SignatureError, match="not an active DC"):
            envelope.open_envelope(env, "k", NOW, self.trusted)

    def test_tampered_body_and_forged_sender(self):
        env = envelope.seal(self.dc_key, "k", {"x": 1}, NOW)
        with pytest.raises(SignatureError):
            envelope.open_envelope({**env, "body": {"x": 2}}, "k", NOW, self.trusted)
        other = envelope.seal(keys.generate(), "k", {"x": 1}, NOW)
        with pytest.raises(SignatureError):
            envelope.open_envelope({**other, "from": env["from"]}, "k", NOW, self.trusted)

    def test_stale_wrong_kind_replayed(self):
        env = envelope.seal(self.dc_key, "k", {}, NOW)
        with pytest.raises(SignatureError, match="freshness"):
            envelope.open_envelope(env, "k", NOW + envelope.MAX_SKEW_MS + 1, self.trusted)
        with pytest.raises(ParseError):
            envelope.open_envelope(env, "other", NOW, self.trusted)
        guard = envelope.ReplayGuard()
        envelope.open_envelope(env, "k", NOW, self.trusted, guard)
        with pytest.raises(SignatureError, match="replayed"):
            envelope.open_envelope(env, "k", NOW, self.trusted, guard)


def test_session_answer_is_bound_to_dc_and_challenge():
    key = keys.generate()
    nid = keys.node_id_of(key)
    sig = session_auth.answer(key, DC, b"c" * 32)
    session_auth.verify(nid, DC, b"c" * 32, sig)
    with pytest.raises(SignatureError):
        session_auth.verify(nid, b"\x99" * 20, b"c" * 32, sig)
    with pytest.raises(SignatureError):
        session_auth.verify(nid, DC, b"d" * 32, sig)


def test_keepalive_roundtrip_and_mac():
    token = b"t" * 32
    pkt = keepalive.encode_request(b"n" * 20, 7, token)
    node, seq, head, mac = keepalive.parse_request(pkt)
    assert (node, seq) == (b"n" * 20, 7) and keepalive.mac_ok(token, head, mac)
    assert not keepalive.mac_ok(b"u" * 32, head, mac)
    reply = keepalive.encode_reply(7, "198.18.0.11", 40000, token)
    assert keepalive.parse_reply(reply, token) == (7, "198.18.0.11", 40000)
    assert keepalive.parse_reply(keepalive.encode_reply(1, "2001:db8::5", 1, token), token) == (1, "2001:db8::5", 1)
    assert keepalive.parse_reply(keepalive.encode_reply(1, "::ffff:10.0.0.1", 9, token), token)[1] == "10.0.0.1"
    assert len(reply) < len(pkt) and len(keepalive.encode_reply(1, "2001:db8::5", 1, token)) < len(
        pkt
    )  # no amplification


def test_a_forged_keepalive_reply_is_refused():
    """Off-path attacker: it spoofs the DC's source to tell a node it moved, without the session
    token, or flips the address or seq of a genuine reply (seq 2^64-1 to poison the window)."""
    token = b"t" * 32
    genuine = keepalive.encode_reply(7, "198.18.0.11", 40000, token)
    forgeries = [
        keepalive.encode_reply(7, "203.0.113.66", 1, b"x" * 32),
        keepalive.encode_reply(2**64 - 1, "198.18.0.11", 40000, b"\0" * 32),
        genuine[:1] + b"\xff" * 8 + genuine[9:],  # seq rewritten
        genuine[:12] + bytes([203, 0, 113, 66]) + genuine[16:],  # address rewritten
        genuine[:-1],
    ]
    for forged in forgeries:
        with pytest.raises(ParseError):
            keepalive.parse_reply(forged, token)


def test_presence_refuses_wrong_token_and_replay():
    from dc.presence import Presence

    p = Presence()
    s = p.open(b"n" * 20, lambda m: None)
    assert p.on_keepalive(keepalive.encode_request(b"n" * 20, 1, b"x" * 32), ("1.1.1.1", 5)) is None
    assert p.observed(b"n" * 20) == (None, None)
    good = keepalive.encode_request(b"n" * 20, 1, s.token)
    assert p.on_keepalive(good, ("198.18.0.11", 5)) is not None
    assert p.on_keepalive(good, ("198.18.0.66", 6)) is None  # replay from elsewhere moves nothing
    assert p.observed(b"n" * 20) == ("198.18.0.11:5", None) and p.dropped_keepalives == 2
    assert p.on_keepalive(keepalive.encode_request(b"n" * 20, 2, s.token), ("198.18.0.11", 7), alt=True)
    assert p.observed(b"n" * 20) == ("198.18.0.11:5", "198.18.0.11:7")


def test_standby_probe_is_answered_and_changes_nothing():
    """Issue 22 item 4: a node's second uplink asks the DC where it is seen from. The DC answers
    (a STANDBY_REPLY, which a node's keepalive handling does not take for its own address) and
    records nothing: the node's address stays its primary uplink's. A probe with a wrong token,
    or replayed, gets no answer; a keepalive cannot be passed off as a probe (the MAC covers the
    kind)."""
    from dc.presence import Presence

    p = Presence()
    s = p.open(b"n" * 20, lambda m: None)
    assert p.on_keepalive(keepalive.encode_request(b"n" * 20, 5, s.token), ("198.18.0.11", 5))
    probe = keepalive.encode_request(b"n" * 20, 1, s.token, keepalive.STANDBY_PROBE)
    reply = p.on_keepalive(probe, ("198.18.0.12", 9))
    assert keepalive.parse_reply(reply, s.token, keepalive.STANDBY_REPLY) == (1, "198.18.0.12", 9)
    with pytest.raises(ParseError):
        keepalive.parse_reply(reply, s.token)
    assert p.observed(b"n" * 20) == ("198.18.0.11:5", None)
    assert p.on_keepalive(probe, ("198.18.0.66", 6)) is None  # replayed
    assert (
        p.on_keepalive(keepalive.encode_request(b"n" * 20, 2, b"x" * 32, keepalive.STANDBY_PROBE), ("198.18.0.12", 9))
        is None
    )
    forged = bytearray(keepalive.encode_request(b"n" * 20, 9, s.token))
    forged[0] = keepalive.STANDBY_PROBE
    assert p.on_keepalive(bytes(forged), ("198.18.0.12", 9)) is None
    assert p.dropped_keepalives == 3


@given(st.binary(max_size=200))
def test_keepalive_parsers_raise_only_parse_error(data):
    for parse in (keepalive.parse_request, lambda d: keepalive.parse_reply(d, b"t" * 32)):
        try:
            parse(data)
        except ParseError:
            pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=70),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=6),
        max_leaves=20,
    )
)
def test_json_parsers_raise_only_parse_error(obj):
    for parse in (parse_request, envelope.parse):
        try:
            parse(obj)
        except ParseError:
            pass
    if isinstance(obj, dict):
        try:
            parse_request({**signed(TestRegistrationCheck.key).to_json(), **obj})
        except ParseError:
            pass

"""Typed end to end (issue 26 item 5): the wire's closed vocabularies are checked at decode."""

import re
from pathlib import Path

import pytest

from dc import groups as dc_groups
from ntm import envelope, keys, messages
from ntm.errors import ParseError, SignatureError
from ntm.registration import RegistrationRequest, parse_request

PATH = "0a" * 8
NOW_MS = 1_700_000_000_000


def test_route_choice_round_trips_its_strings():
    """The wire form is the same plain strings a peer sent before the fields were typed."""
    wire = {"path": PATH, "kind": "nat_initiates", "reason": "B is public", "role": "wait"}
    assert messages.encode(messages.decode(messages.RouteChoice, wire)) == wire


@pytest.mark.parametrize("field,value", [("kind", "teleport"), ("role", "lead"), ("kind", "RELAY"), ("role", 1)])
def test_a_route_kind_or_role_outside_the_vocabulary_is_refused(field, value):
    """A hostile or buggy DC sends a route kind or role no node knows: refused at decode, not later
    by a branch that falls through."""
    wire = {"path": PATH, "kind": "relay", "reason": "r", "role": "initiate", field: value}
    with pytest.raises(ParseError, match=field):
        messages.decode(messages.RouteChoice, wire)


def test_registration_encodes_through_the_struct_the_dc_decodes():
    """The node's Registration Request is the DC's RegisterBody: what one end encodes, the other
    parses back to the same request and wait flag; the older hand-built form (defaults spelled
    out) still parses the same, so a node of the last release registers unchanged."""
    key = keys.generate()
    info = messages.DcInfoReply(keys.checksum(b"\x07" * 20), "dc1", 31337, keys.checksum(b"\x09" * 20), [1], [], True)
    req = RegistrationRequest.signed(key, info, 1_700_000_000_000, ["10.0.0.1:4330"])
    for wait in (False, True):
        assert parse_request(messages.encode(req.body(wait))) == (req, wait)
    bare = RegistrationRequest.signed(key, info, 1_700_000_000_001)
    old_form = {
        "record": bare.record.to_json(),
        "signature": bare.signature.hex(),
        "pubkey": bare.pubkey.hex(),
        "local_addrs": [],
    }
    assert parse_request(old_form) == parse_request(bare.to_json()) == (bare, False)


# Every envelope kind the code seals or opens by constant, and the group kinds the node sends.
ENVELOPE_KINDS = {
    messages.ROUTE_DIRECTION,
    messages.RELAY_DIRECTION,
    messages.RELAY_DIRECTIONS,
    messages.INFO_REQUEST,
    messages.INFO_RESPONSE,
    messages.DIRECTION_OFFER,
    messages.DIRECTION_ANSWER,
    messages.CS_NOTICE,
    messages.CHANNEL_HELLO,
    messages.CS_PUT,
    messages.CS_LIST,
    messages.CS_GET,
    messages.CS_ACK,
    messages.EXIT_REQUEST,
    messages.EXIT_BOOKING,
}


def test_the_registry_names_a_body_for_every_envelope_kind():
    """A kind without a body struct would be opened by hand again; the node's group requests
    (literal kinds in node/groups.py) are all GMS kinds the DC serves."""
    node_group_kinds = set(re.findall(r'"(group\.[a-z]+)"', Path("node/groups.py").read_text()))
    assert node_group_kinds and node_group_kinds <= set(dc_groups.KINDS)
    assert set(messages.BODY_OF) == ENVELOPE_KINDS | set(dc_groups.KINDS)
    assert all(issubclass(body, messages.Message) for body in messages.BODY_OF.values())


def test_a_sealed_struct_opens_as_the_same_struct():
    key = keys.generate()
    ref = messages.CsItemRef("ab" * 16)
    sealed = envelope.seal_body(key, messages.CS_GET, ref, NOW_MS)
    assert envelope.open_body(sealed, messages.CS_GET, messages.CsItemRef, NOW_MS, lambda _: True)[1] == ref


def test_a_body_that_is_not_its_kinds_struct_is_a_bug_not_a_message():
    """A caller sealing or asking for the wrong struct fails loudly before anything is sent."""
    key = keys.generate()
    with pytest.raises(TypeError):
        envelope.seal_body(key, messages.CS_GET, messages.CsListRequest(), NOW_MS)
    sealed = envelope.seal_body(key, messages.CS_GET, messages.CsItemRef("ab" * 16), NOW_MS)
    with pytest.raises(TypeError):
        envelope.open_body(sealed, messages.CS_GET, messages.CsPut, NOW_MS, lambda _: True)


def test_a_signed_envelope_with_a_malformed_body_is_refused_naming_the_field():
    """A node (validly signing) sends a CS_GET whose body is not an item reference: ParseError,
    never an exception from deep inside the handler."""
    sealed = envelope.seal(keys.generate(), messages.CS_GET, {"item": "not hex"}, NOW_MS)
    with pytest.raises(ParseError, match="item"):
        envelope.open_body(sealed, messages.CS_GET, messages.CsItemRef, NOW_MS, lambda _: True)


def test_a_signed_direction_travels_as_a_struct_and_still_verifies():
    """The direction a DC pushes is a SignedEnvelope inside DirectionPush: re-encoded it is the
    very object that was signed (so the node verifies the signature), and a push whose envelope
    lacks its signature is refused when the session message is decoded."""
    body = messages.CsItemRef("cd" * 16)
    sealed = envelope.seal_body(keys.generate(), messages.CS_GET, body, NOW_MS)
    push = messages.decode(messages.DcToNode, messages.encode(messages.DirectionPush(envelope.signed(sealed))))
    assert isinstance(push.direction, messages.SignedEnvelope) and messages.encode(push.direction) == sealed
    assert envelope.open_body(push.direction, messages.CS_GET, messages.CsItemRef, NOW_MS, lambda _: True)[1] == body
    unsigned = {k: v for k, v in sealed.items() if k != "sig"}
    with pytest.raises(ParseError, match="sig"):
        messages.decode(messages.DcToNode, {"type": "direction", "direction": unsigned})


def test_open_body_makes_every_check_open_envelope_makes():
    """Adversaries: a replayed, stale, untrusted or relabelled envelope reaching a receiver that
    opens it with open_body: each is refused as open_envelope refuses it (the one-call form must
    not drop a check), and seal_body keeps the nonce it is given."""
    key = keys.generate()
    ref = messages.CsItemRef("ab" * 16)
    sealed = envelope.seal_body(key, messages.CS_GET, ref, NOW_MS, nonce=bytes(range(16)))
    assert sealed["nonce"] == bytes(range(16)).hex()
    guard = envelope.ReplayGuard()
    env, body = envelope.open_body(sealed, messages.CS_GET, messages.CsItemRef, NOW_MS, lambda _: True, guard)
    assert (env.sender, env.kind, body) == (keys.node_id_of(key), messages.CS_GET, ref)
    with pytest.raises(SignatureError, match="^envelope replayed$"):
        envelope.open_body(sealed, messages.CS_GET, messages.CsItemRef, NOW_MS, lambda _: True, guard)
    with pytest.raises(SignatureError, match="is not an active DC$"):
        envelope.open_body(sealed, messages.CS_GET, messages.CsItemRef, NOW_MS, lambda _: False)
    with pytest.raises(SignatureError, match="freshness window"):
        envelope.open_body(
            sealed, messages.CS_GET, messages.CsItemRef, NOW_MS + envelope.MAX_SKEW_MS + 1, lambda _: True
        )
    with pytest.raises(ParseError, match="^expected a 'cs\\.list' envelope, got 'cs\\.get'$"):
        envelope.open_body(sealed, messages.CS_LIST, messages.CsListRequest, NOW_MS, lambda _: True)


def test_a_wrong_struct_names_the_kind_and_both_structs():
    """A bug sealing or asking for the wrong struct says which kind, which struct it carries and
    which was given, so the wrong call site is found at once."""
    key = keys.generate()
    with pytest.raises(TypeError, match=r"^a 'cs\.get' envelope carries a <class '.*CsItemRef'>, not CsListRequest$"):
        envelope.seal_body(key, messages.CS_GET, messages.CsListRequest(), NOW_MS)
    sealed = envelope.seal_body(key, messages.CS_GET, messages.CsItemRef("ab" * 16), NOW_MS)
    env = envelope.open_envelope(sealed, messages.CS_GET, NOW_MS, lambda _: True)
    with pytest.raises(TypeError, match=r"^a 'cs\.get' envelope carries a <class '.*CsItemRef'>, not CsPut$"):
        envelope.body_of(env, messages.CsPut)

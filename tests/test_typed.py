"""Typed end to end (issue 26 item 5): the wire's closed vocabularies are checked at decode."""

import pytest

from ntm import keys, messages
from ntm.errors import ParseError
from ntm.registration import RegistrationRequest, parse_request

PATH = "0a" * 8


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

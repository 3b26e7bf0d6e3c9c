"""Typed end to end (issue 26 item 5): the wire's closed vocabularies are checked at decode."""

import pytest

from ntm import messages
from ntm.errors import ParseError

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

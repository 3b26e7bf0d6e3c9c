"""The route decision table (docs/PROTOCOL.md §8.1)."""

import pytest

from ntm.route import Reach, decide

PUB_A = Reach(("198.18.0.20:4330",), "198.18.0.20:4330", "198.18.0.20:4330")
PUB_B = Reach(("198.18.0.21:4330",), "198.18.0.21:4330", "198.18.0.21:4330")
EIM_A = Reach(("10.1.0.2:4330",), "198.18.0.11:4330", "198.18.0.11:4330")
EIM_B = Reach(("10.2.0.2:4330",), "198.18.0.12:4330", "198.18.0.12:4330")
SYM_A = Reach(("10.1.0.2:4330",), "198.18.0.11:31000", "198.18.0.11:42000")
SYM_B = Reach(("10.2.0.2:4330",), "198.18.0.12:31000", "198.18.0.12:42000")
V6_A = Reach(("[2001:db8:0:1::30]:4330",), "[2001:db8:0:1::30]:4330", "[2001:db8:0:1::30]:4330")
V6_B = Reach(("[2001:db8:0:1::31]:4330",), "[2001:db8:0:1::31]:4330", "[2001:db8:0:1::31]:4330")
UNKNOWN = Reach(("10.3.0.2:4330",))  # no keepalive ever reached its DC: UDP blocked (§8.4)

TABLE = [
    (PUB_A, PUB_B, "direct", "a"),
    (EIM_A, PUB_B, "nat_initiates", "a"),
    (PUB_A, EIM_B, "nat_initiates", "b"),
    (SYM_A, PUB_B, "nat_initiates", "a"),
    (PUB_A, SYM_B, "nat_initiates", "b"),
    (EIM_A, EIM_B, "punch", "both"),
    (EIM_A, SYM_B, "relay", None),
    (SYM_A, EIM_B, "relay", None),
    (SYM_A, SYM_B, "relay", None),
    (V6_A, V6_B, "direct", "a"),
    (V6_A, PUB_B, "relay", None),
    (EIM_A, V6_B, "relay", None),
    (UNKNOWN, EIM_B, "relay", None),
    (PUB_A, UNKNOWN, "relay", None),
]


@pytest.mark.parametrize("a,b,kind,initiator", TABLE)
def test_route_table(a, b, kind, initiator):
    route = decide(a, b)
    assert (route.kind, route.initiator) == (kind, initiator), route.reason


def test_nat_kinds():
    assert [r.nat for r in (PUB_A, EIM_A, SYM_A, UNKNOWN)] == ["none", "eim", "symmetric", "unknown"]


def test_families_count_the_observed_address_too():
    """A dual-stack node announcing only its IPv6 address but seen over IPv4 can be reached over
    both; a node never observed has only the families it announced."""
    assert Reach(("[2001:db8::1]:4330",), "198.18.0.11:4330").families() == {4, 6}
    assert UNKNOWN.families() == {4}


def test_candidates_prefer_lan_behind_the_same_nat():
    a = Reach(("10.1.0.2:4330",), "198.18.0.11:5000")
    b = Reach(("10.1.0.3:4330",), "198.18.0.11:6000")
    assert a.candidates(b) == ["10.1.0.2:4330", "198.18.0.11:5000"]
    assert a.candidates(EIM_B) == ["198.18.0.11:5000", "10.1.0.2:4330"]


def test_candidates_keep_the_peers_family():
    dual = Reach(("10.1.0.2:4330", "[2001:db8:0:1::40]:4330"), "198.18.0.11:4330")
    assert dual.candidates(V6_B) == ["[2001:db8:0:1::40]:4330"]


def test_only_observed_addresses_are_verified_even_behind_a_shared_public_ip():
    """Reflection bound (issue 11 item 1, issue 29 item 8): a node's announced local addresses are
    never verified, only its observed mapping, plus at most one unverified address. The attacker
    sharing its victim's public IP (carrier-grade NAT, one office NAT) gains nothing: its LAN
    address comes first but stays the one unverified candidate."""
    liar = Reach(("10.1.0.2:4330", "203.0.113.5:53", "203.0.113.6:53", "203.0.113.7:53"), "198.18.0.11:5000")
    assert liar.verified_candidates(EIM_B) == (["198.18.0.11:5000"], ["10.1.0.2:4330"])
    same_nat = Reach(("10.1.0.3:4330",), "198.18.0.11:6000")
    assert liar.verified_candidates(same_nat) == (["198.18.0.11:5000"], ["10.1.0.2:4330"])
    dual = Reach(("198.18.0.20:4330", "[2001:db8:0:1::40]:4330"), "198.18.0.20:4330")
    assert dual.verified_candidates(V6_B) == ([], ["[2001:db8:0:1::40]:4330"])  # unobserved family
    assert Reach(("10.3.0.2:4330",)).verified_candidates(EIM_B) == ([], ["10.3.0.2:4330"])


def test_each_route_says_why():
    """The reason travels in the Route Choice to the requester and into the DC's direction log:
    an operator reading why a tunnel went through the relay must see which side lacked what."""
    why = "no keepalive reached its DC): relay over TCP"
    assert [decide(a, b).reason for a, b, _, _ in TABLE if (a, b) != (V6_A, V6_B)] == [
        "both public",
        "B is public, A is behind a eim NAT",
        "A is public, B is behind a eim NAT",
        "B is public, A is behind a symmetric NAT",
        "A is public, B is behind a symmetric NAT",
        "both behind NATs (eim, eim): simultaneous hole punch",
        "symmetric NAT on one side and a NAT on the other: no punch possible",
        "symmetric NAT on one side and a NAT on the other: no punch possible",
        "symmetric NAT on one side and a NAT on the other: no punch possible",
        "no common address family (IPv4-only vs IPv6-only)",
        "no common address family (IPv4-only vs IPv6-only)",
        f"A has no UDP ({why}",
        f"B has no UDP ({why}",
    ]

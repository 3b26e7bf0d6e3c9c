"""Route decision: given what the DCs know about two nodes, how should they build their tunnel?

Pure function of its inputs, table-tested (tests/test_route.py). docs/PROTOCOL.md §8.1.

NAT kinds come from the node's keepalives: the DC listens on two UDP ports; a node whose two
observed mappings differ is behind a symmetric NAT (the mapping depends on the destination), one
whose observed address is one of its own local addresses is not behind a NAT at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ntm.addr import family, parse_endpoint

#: Addresses nobody verified (announced, not observed) that a direction may carry: they serve two
#: nodes on one LAN behind different uplinks, or a dual-stack host's unobserved family, and each
#: makes the peer send to an address a node merely claimed (reflection, PROTOCOL §8.1).
MAX_UNVERIFIED_CANDIDATES = 1

NatKind = Literal["none", "eim", "symmetric", "unknown"]
RouteKind = Literal["direct", "nat_initiates", "punch", "relay"]


@dataclass(frozen=True)
class Reach:
    """One node's reachability as its home DC sees it."""

    local: tuple[str, ...] = ()  # endpoints the node announced ("ip:port")
    observed: str | None = None  # its public mapping, as seen by the DC's first keepalive port
    observed_alt: str | None = None  # the mapping seen by the DC's second keepalive port

    @property
    def nat(self) -> NatKind:
        if self.observed is None:
            return "unknown"
        if self.observed in self.local:
            return "none"
        if self.observed_alt is not None and self.observed_alt != self.observed:
            return "symmetric"
        return "eim"

    def families(self) -> set[int]:
        eps = list(self.local) + ([self.observed] if self.observed else [])
        return {family(e) for e in eps}

    def candidates(self, peer: "Reach") -> list[str]:
        """Where the peer should send to reach this node, best first.

        Behind the same public address (same NAT) the LAN address comes first: many NATs do not
        hairpin. Otherwise the public mapping, then the local addresses (which also serve two
        nodes on one LAN with different uplinks).
        """
        public = [self.observed] if self.observed else []
        local = [e for e in self.local if e not in public]
        same_nat = self.observed and peer.observed and _ip(self.observed) == _ip(peer.observed)
        ordered = local + public if same_nat else public + local
        families = peer.families()
        return [e for e in ordered if family(e) in families] or ordered

    def verified_candidates(self, peer: "Reach") -> tuple[list[str], list[str]]:
        """candidates() split into what the DC verified and at most MAX_UNVERIFIED_CANDIDATES
        others. Verified: only the observed mapping (the DC received from it). A shared public IP
        proves nothing (carrier-grade NAT, one office NAT: the attacker may share the victim's), so
        local addresses stay unverified even then; behind one NAT the LAN address comes first and
        is the one unverified candidate (issue 29 item 8)."""
        verified, unverified = [], []
        for e in self.candidates(peer):
            (verified if e == self.observed else unverified).append(e)
        return verified, unverified[:MAX_UNVERIFIED_CANDIDATES]


def _ip(endpoint: str) -> str:
    return parse_endpoint(endpoint)[0]


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    initiator: Literal["a", "b", "both", None]
    reason: str


def decide(a: Reach, b: Reach) -> Route:
    """How A (the requester) and B connect. Relay when no direct path can work."""
    for name, r in (("A", a), ("B", b)):
        if r.observed is None:  # its keepalives never reached the DC: its network lets no UDP out
            return Route("relay", None, f"{name} has no UDP (no keepalive reached its DC): relay over TCP")
    if not a.families() & b.families():
        return Route("relay", None, "no common address family (IPv4-only vs IPv6-only)")
    na, nb = a.nat, b.nat
    if "symmetric" in (na, nb) and not ({na, nb} & {"none"}):
        return Route("relay", None, "symmetric NAT on one side and a NAT on the other: no punch possible")
    if na == "none" and nb == "none":
        return Route("direct", "a", "both public")
    if nb == "none":
        return Route("nat_initiates", "a", f"B is public, A is behind a {na} NAT")
    if na == "none":
        return Route("nat_initiates", "b", f"A is public, B is behind a {nb} NAT")
    return Route("punch", "both", f"both behind NATs ({na}, {nb}): simultaneous hole punch")

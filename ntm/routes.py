"""Routes a node offers and routes a node uses (docs/PROTOCOL.md §10.10), without any I/O.

A node may offer to forward traffic for subnets behind it (`ntm up --advertise-routes`) or for
everything (`--advertise-exit`). The offer is signed by the node's key, so the DC that carries
it cannot forge or widen it. Which offers a node *uses* is its user's choice (`--use-routes`,
`--exit-node`), never automatic. The table then answers, per packet:

    table = RouteTable(advertised=parse_prefixes("10.77.0.0/24"))
    table.choose({peer: None}, exit_node=None)    # use every route `peer` offers
    table.learn(verify_offer(offer))              # an offer fetched from the peer's DC
    table.lookup(dst)          # which peer a packet to `dst` goes to (longest prefix), or None
    table.source_ok(peer, src) # may `peer` send with inner source `src` (offered AND accepted)?
    table.claimed(src)         # is `src` an address some route here stands for (then only its
                               # accepted peer may use it: anyone else's packet is a spoof)
    table.forwards(dst)        # does this node forward to `dst` (its own advertised routes)?
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Callable
from ipaddress import IPv4Network, IPv6Network, ip_network

import coincurve

from ntm import keys
from ntm.errors import NtmError
from ntm.messages import MAX_OFFERED_ROUTES, RouteOffer
from ntm.vaddr import V6_PREFIX

Net = IPv4Network | IPv6Network

#: Domain separation of the offer's signature: no other signed object of the protocol hashes to it.
OFFER_DOMAIN = b"ntm-route-offer/1"
EXIT_ROUTES: tuple[Net, ...] = (IPv4Network("0.0.0.0/0"), IPv6Network("::/0"))
#: Never offered nor accepted: the overlay's own prefix (its addresses are self-certifying, §10.1),
#: and addresses that are not forwarded by any router (loopback, link-local, multicast, "this network").
FORBIDDEN: tuple[Net, ...] = (
    V6_PREFIX,
    IPv4Network("127.0.0.0/8"),
    IPv4Network("169.254.0.0/16"),
    IPv4Network("224.0.0.0/4"),
    IPv4Network("0.0.0.0/8"),
    IPv6Network("::1/128"),
    IPv6Network("fe80::/10"),
    IPv6Network("ff00::/8"),
    IPv6Network("::/128"),
)


class RouteError(NtmError):
    """A route offer or a route choice that is refused (and changes nothing)."""

    code = "bad_route"


def parse_prefixes(text: str | list[str]) -> list[Net]:
    """ "10.1.0.0/24,fd00:1::/64" (or a list) → networks; RouteError naming the bad one. A prefix
    with host bits set, /0 (that is `--advertise-exit`), or one touching FORBIDDEN is refused."""
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    nets: list[Net] = []
    for item in items:
        if not item:
            continue
        try:
            net = ip_network(item, strict=True)
        except ValueError as exc:
            raise RouteError(f"route {item!r}: {exc}") from None
        if net.prefixlen == 0:
            raise RouteError(f"route {item}: a default route is offered with --advertise-exit, not as a route")
        bad = next((f for f in FORBIDDEN if f.version == net.version and net.overlaps(f)), None)
        if bad is not None:
            raise RouteError(f"route {item} overlaps {bad}, which is never routed through the overlay")
        if net not in nets:
            nets.append(net)
    if len(nets) > MAX_OFFERED_ROUTES:
        raise RouteError(f"{len(nets)} routes: at most {MAX_OFFERED_ROUTES} may be offered")
    return nets


def offer_digest(node: bytes, seq: int, routes: list[Net], exit: bool) -> bytes:
    """SHA-256(OFFER_DOMAIN || node 20 || seq u64 || exit u8 || count u8 || per route: version u8
    || prefix length u8 || address 4 or 16), routes in the offer's order."""
    parts = [OFFER_DOMAIN, node, struct.pack("!QBB", seq, int(exit), len(routes))]
    parts += [bytes((n.version, n.prefixlen)) + n.network_address.packed for n in routes]
    return hashlib.sha256(b"".join(parts)).digest()


def sign_offer(key: coincurve.PrivateKey, routes: list[Net], exit: bool, seq: int) -> RouteOffer:
    node = keys.node_id_of(key)
    sig = keys.sign_digest(key, offer_digest(node, seq, routes, exit))
    return RouteOffer(keys.checksum(node), seq, sig.hex(), [str(n) for n in routes], exit)


@dataclass(frozen=True)
class Offer:
    """A verified offer: `node` signed exactly these routes at `seq`."""

    node: bytes
    seq: int
    routes: tuple[Net, ...]
    exit: bool


def verify_offer(offer: RouteOffer) -> Offer:
    """The offer if its signature is the named node's and every route is acceptable; RouteError."""
    node = keys.parse_node_id(offer.node)
    nets = parse_prefixes(offer.routes)
    if [str(n) for n in nets] != list(offer.routes):
        raise RouteError("route offer is not canonical (a repeated or non-normal prefix)")
    try:
        signer = keys.recover_node_id(offer_digest(node, offer.seq, nets, offer.exit), bytes.fromhex(offer.sig))
    except NtmError as exc:
        raise RouteError(f"route offer signature: {exc}") from None
    if signer != node:
        raise RouteError(f"route offer of {offer.node} is signed by {keys.checksum(signer)}")
    return Offer(node, offer.seq, tuple(nets), offer.exit)


def _key(net: Net) -> tuple[int, int, int]:
    """(network as int, mask as int, version) for the per-packet checks on packed addresses."""
    return int(net.network_address), int(net.netmask), net.version


def _entries(routes: dict[Net, bytes]) -> list[tuple[tuple[int, int, int], bytes]]:
    """(route key, peer) pairs, longest prefix first: the first match is the most specific."""
    return sorted(((_key(n), p) for n, p in routes.items()), key=lambda e: -e[0][1].bit_count())


def _contains(entries: list[tuple[tuple[int, int, int], bytes]], addr: bytes) -> bytes | None:
    """The node of the first entry (longest prefix first) that holds `addr` (4 or 16 bytes)."""
    a, version = int.from_bytes(addr), 4 if len(addr) == 4 else 6
    for (net, mask, v), node in entries:
        if v == version and a & mask == net:
            return node
    return None


class RouteTable:
    """This node's advertised routes and the routes it accepted from peers' verified offers.
    Accepted = what the user chose ∩ what the peer's newest offer contains; nothing else."""

    def __init__(
        self, advertised: list[Net] | None = None, exit_offered: bool = False, local: Net | None = None
    ) -> None:
        """`local`: this node's own virtual IPv4 network: a route overlapping it is never accepted."""
        self.advertised = tuple(advertised or ())
        self.exit_offered = exit_offered
        self.local = local
        self.offers: dict[bytes, Offer] = {}
        self.wanted: dict[bytes, frozenset[Net] | None] = {}  # peer → the routes chosen (None: all it offers)
        self.exit_node: bytes | None = None
        self.accepted: dict[bytes, tuple[Net, ...]] = {}
        self.refused: dict[str, str] = {}  # route → why an offered route the user chose is not used
        self._routes: list[tuple[tuple[int, int, int], bytes]] = []  # accepted, longest prefix first
        self._claims: list[tuple[tuple[int, int, int], bytes]] = []  # accepted and advertised, no /0
        self._own = _entries({n: b"" for n in self.advertised + (EXIT_ROUTES if exit_offered else ())})
        self._local = _entries({local: b""} if local is not None else {})

    def choose(self, wanted: dict[bytes, frozenset[Net] | None], exit_node: bytes | None) -> None:
        """The user's choice: the peers whose routes are used (all they offer, or only these), and
        the exit node (its 0.0.0.0/0 and ::/0, if it offers them)."""
        self.wanted, self.exit_node = dict(wanted), exit_node
        self._rebuild()

    def peers(self) -> set[bytes]:
        """The peers whose offers this node needs to know."""
        return set(self.wanted) | ({self.exit_node} if self.exit_node else set())

    def learn(self, offer: Offer) -> bool:
        """Take a peer's verified offer if it is newer than the one known; True if routes changed."""
        known = self.offers.get(offer.node)
        if known is not None and known.seq >= offer.seq:
            return False
        self.offers[offer.node] = offer
        before = dict(self.accepted)
        self._rebuild()
        return before != self.accepted

    def _rebuild(self) -> None:
        accepted: dict[bytes, list[Net]] = {}
        taken: dict[Net, bytes] = {}
        self.refused = {}
        for peer in sorted(self.peers()):  # one owner per prefix, the same on every rebuild
            offer = self.offers.get(peer)
            if offer is None:
                continue
            chosen = self.wanted.get(peer, frozenset())  # only the exit node: none of its routes
            nets = [n for n in offer.routes if chosen is None or n in chosen]
            if peer == self.exit_node and offer.exit:
                nets += EXIT_ROUTES
            for n in nets:
                why = self._conflict(n, taken)
                if why:
                    self.refused[str(n)] = why
                    continue
                taken[n] = peer
                accepted.setdefault(peer, []).append(n)
        self.accepted = {p: tuple(ns) for p, ns in accepted.items()}
        self._routes = _entries(taken)
        self._claims = _entries(
            {n: p for n, p in {**taken, **dict.fromkeys(self.advertised, b"")}.items() if n.prefixlen}
        )

    def _conflict(self, net: Net, taken: dict[Net, bytes]) -> str:
        if net in taken:
            return f"also offered by {keys.checksum(taken[net])}, whose offer is used"
        if net.prefixlen and any(net.version == a.version and net.overlaps(a) for a in self.advertised):
            return "overlaps a route this node advertises"
        if net.prefixlen and self.local is not None and net.version == self.local.version and net.overlaps(self.local):
            return f"overlaps this node's virtual network {self.local}"
        return ""

    def lookup(self, dst: bytes) -> bytes | None:
        """The peer whose accepted route holds `dst` (longest prefix), or None."""
        return _contains(self._routes, dst) if self._routes else None

    def source_ok(self, peer: bytes, src: bytes) -> bool:
        """`src` is inside a route `peer` offers and this node accepted from it."""
        return bool(self._routes) and _contains(self._routes, src) == peer

    def claimed(self, src: bytes) -> bool:
        """`src` lies in a route (not a default one) this node accepted or advertises: only the
        peer that route was accepted from may send from it."""
        return bool(self._claims) and _contains(self._claims, src) is not None

    def forwards(self, dst: bytes) -> bool:
        """This node forwards packets to `dst`: its advertised routes, or anything outside its own
        virtual network as an exit."""
        return bool(self._own) and _contains(self._own, dst) is not None and _contains(self._local, dst) is None


def parse_choice(items: list[str], resolve: Callable[[str], bytes]) -> dict[bytes, frozenset[Net] | None]:
    """`--use-routes` items, each "PEER" (every route PEER offers) or "PEER:PREFIX" (only that one;
    repeat for more), PEER a node ID or alias that `resolve` turns into a node ID (raising
    NtmError/ValueError if it cannot). RouteError for anything malformed."""
    wanted: dict[bytes, frozenset[Net] | None] = {}
    for item in (x.strip() for chunk in items for x in chunk.split(",")):
        if not item:
            continue
        name, _, prefix = item.partition(":")
        try:
            peer = resolve(name)
        except (NtmError, ValueError) as exc:
            raise RouteError(f"--use-routes {item}: {exc}") from None
        if not prefix:
            wanted[peer] = None
        elif wanted.get(peer, frozenset()) is not None:
            wanted[peer] = wanted.get(peer, frozenset()) | frozenset(parse_prefixes(prefix))  # type: ignore[operator]
    return wanted

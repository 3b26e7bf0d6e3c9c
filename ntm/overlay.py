"""The overlay's routing rules for inner packets (docs/PROTOCOL.md §10), without any I/O.

Outbound (read from TUN): the destination address names the peer, or the packet is not ours.
Inbound (decrypted from a peer's tunnel): cryptokey routing, as WireGuard does it. An IPv6
packet must come from the authenticated peer's own overlay address and go to ours; an IPv4
packet gets its source rewritten to the address this node gave that peer and its destination to
our own (the receiver translates, so a peer cannot name any other source at all). Subnet routes
(ntm/routes.py, §10.10) widen both rules by exactly what was offered and accepted: a source in a
route accepted from that peer is kept, a destination in a route this node advertises is kept.

Tunnel payloads carry either an inner IP packet as is (first nibble 4 or 6) or an application
datagram (`ntm send`) behind one APP byte (0x00), so the IP path costs no copy.

    ov = Overlay(my_id, V4Book())
    peer = ov.outbound(packet)            # node ID to send to, or None (counted)
    pkt = ov.inbound(peer_id, payload)    # bytes for TUN, or None (dropped, counted)
"""

from __future__ import annotations

import hashlib
import struct
from ipaddress import IPv4Address, IPv6Address

from ntm.routes import RouteTable
from ntm.vaddr import AddressError, V4Book, is_overlay_v6, v6_of

#: First byte of an application datagram inside a tunnel; IP packets start with 0x4_ or 0x6_.
APP = 0x00
#: A group datagram (node/groups.py), which the receiver acknowledges with GROUP_ACK || its digest.
GROUP, GROUP_ACK = 0x01, 0x02
#: A piece of an IPv6 packet the path cannot carry whole but IPv6 must (up to 1280 bytes; ntm/toobig.py).
FRAG = 0x03
#: A QUIC packet of the inner stream protocol (node/streams.py), to the connection's server side
#: (the peer that accepted it) or to its client side (the peer that opened it).
QUIC_TO_SERVER, QUIC_TO_CLIENT = 0x04, 0x05
#: "I see you as ADDRESS": VIEW || flags (1) || IPv4 (4), the address the sender gave the receiver
#: in its own IPv4 view (§10.2), which the receiver cannot compute; flag VIEW_ASK asks for the
#: receiver's in return. Only for `ntm status`: nothing routes by it. Flag VIEW_CSUM: the sender
#: finishes TCP/UDP checksums of what it receives (an offloading TUN, §10.11), so packets to it may
#: carry partial ones.
VIEW, VIEW_ASK, VIEW_CSUM, VIEW_LEN = 0x06, 0x01, 0x02, 6
ACK_DIGEST_LEN = 16
KIND_APP, KIND_IPV4, KIND_IPV6, KIND_JUNK = "app", "ipv4", "ipv6", "junk"
KIND_GROUP, KIND_GROUP_ACK, KIND_FRAG, KIND_VIEW = "group", "group_ack", "frag", "view"

IPV4_MIN_HEADER = 20
IPV6_HEADER = 40
PROTO_TCP, PROTO_UDP = 6, 17
#: Offset of the checksum in the TCP and UDP headers: both cover the IPv4 addresses.
L4_CHECKSUM_AT = {PROTO_TCP: 16, PROTO_UDP: 6}
_H = struct.Struct("!H")

COUNTERS = (
    "tx_no_route",
    "tx_malformed",
    "rx_ipv4",
    "rx_ipv6",
    "rx_app",
    "rx_spoofed_source",
    "rx_wrong_destination",
    "rx_malformed",
    "addr_collisions",
)


def frame_app(data: bytes) -> bytes:
    return bytes((APP,)) + data


def frame_group(data: bytes) -> bytes:
    return bytes((GROUP,)) + data


def group_ack(framed: bytes) -> bytes:
    """The acknowledgement of a framed group datagram: GROUP_ACK || SHA-256(framed)[:16]."""
    return bytes((GROUP_ACK,)) + hashlib.sha256(framed).digest()[:ACK_DIGEST_LEN]


def frame_view(addr: IPv4Address, ask: bool, csum: bool = False) -> bytes:
    return bytes((VIEW, (VIEW_ASK if ask else 0) | (VIEW_CSUM if csum else 0))) + addr.packed


def parse_view(payload: bytes) -> tuple[IPv4Address, bool] | None:
    """A VIEW payload's (address, ask), or None if it is not one (other flag bits are ignored)."""
    if len(payload) != VIEW_LEN or payload[0] != VIEW:
        return None
    return IPv4Address(payload[2:]), bool(payload[1] & VIEW_ASK)


def kind_of(payload: bytes) -> str:
    if not payload:
        return KIND_JUNK
    first = payload[0]
    if first == APP:
        return KIND_APP
    if first == GROUP:
        return KIND_GROUP
    if first == GROUP_ACK:
        return KIND_GROUP_ACK
    if first == FRAG:
        return KIND_FRAG
    if first == VIEW:
        return KIND_VIEW
    version = first >> 4
    return KIND_IPV4 if version == 4 else KIND_IPV6 if version == 6 else KIND_JUNK


def _sum16(data: bytes) -> int:
    """One's-complement sum (unfolded) of big-endian 16-bit words; `data` has even length."""
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def adjust_checksum(checksum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3: the checksum after words `old` became `new` (HC' = ~(~HC + ~m + m'))."""
    s = (~checksum & 0xFFFF) + _sum16(new) + (0xFFFF * (len(old) // 2) - _sum16(old))
    return ~_fold(s) & 0xFFFF


def ipv4_checksum(header: bytes) -> int:
    return ~_fold(_sum16(header)) & 0xFFFF


def rewrite_v4(pkt: bytes, src: bytes, dst: bytes) -> bytes | None:
    """`pkt` with source and destination replaced and the IPv4, TCP and UDP checksums adjusted;
    None if it is not a well-formed IPv4 packet."""
    n = len(pkt)
    if n < IPV4_MIN_HEADER:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    total = _H.unpack_from(pkt, 2)[0]
    if ihl < IPV4_MIN_HEADER or total < ihl or total > n:
        return None
    out = bytearray(pkt[:total])
    old = bytes(out[12:20])
    new = src + dst
    out[12:20] = new
    out[10:12] = b"\0\0"
    out[10:12] = _H.pack(ipv4_checksum(bytes(out[:ihl])))
    frag_offset = _H.unpack_from(out, 6)[0] & 0x1FFF
    at = L4_CHECKSUM_AT.get(out[9])
    if at is not None and frag_offset == 0 and total >= ihl + at + 2:
        c = _H.unpack_from(out, ihl + at)[0]
        if not (out[9] == PROTO_UDP and c == 0):  # UDP over IPv4 may carry no checksum
            c = adjust_checksum(c, old, new)
            if out[9] == PROTO_UDP and c == 0:
                c = 0xFFFF
            out[ihl + at : ihl + at + 2] = _H.pack(c)
    return bytes(out)


class Overlay:
    """Who an outbound packet is for; whether (and as what) an inbound packet may reach TUN."""

    def __init__(self, my_id: bytes, book: V4Book, routes: RouteTable | None = None) -> None:
        self.my_id = my_id
        self.book = book
        self.routes = routes or RouteTable(local=book.net)  # subnet routes offered and accepted (§10.10)
        self.my_v6 = v6_of(my_id).packed
        self.my_v4 = book.own.packed
        self.v6_peers: dict[bytes, bytes] = {}  # overlay IPv6 (packed) → node ID, learned from full IDs
        self.stats = dict.fromkeys(COUNTERS, 0)

    def learn(self, peer: bytes) -> None:
        """Make `peer` reachable at its IPv6 address. AddressError if another known peer already
        has that address (a 96-bit collision): the first one keeps it, no packet is misrouted."""
        addr = v6_of(peer).packed
        other = self.v6_peers.setdefault(addr, peer)
        if other != peer:
            self.stats["addr_collisions"] += 1
            raise AddressError(f"{IPv6Address(addr)} already belongs to 0x{other.hex()}")

    def addresses(self, peer: bytes, keep: bool = True) -> tuple[IPv6Address, IPv4Address]:
        """The peer's virtual addresses as this node's applications see them (assigning IPv4).
        `keep=False`: a name lookup, nothing persisted (V4Book.assign); AddressError beyond
        vaddr.LOOKED_UP_MAX such peers, before anything is learned."""
        if self.v6_peers.get(v6_of(peer).packed, peer) != peer:
            self.learn(peer)  # a collision: refused (and counted) before any address is given
        v4 = self.book.assign(peer, keep)
        self.learn(peer)
        return v6_of(peer), v4

    def outbound(self, pkt: bytes) -> bytes | None:
        """The node ID a packet read from TUN goes to; None (counted) if no peer has its address."""
        kind = kind_of(pkt)
        if kind == KIND_IPV6 and len(pkt) >= IPV6_HEADER:
            dst = pkt[24:40]
            peer = self.v6_peers.get(dst)
        elif kind == KIND_IPV4 and len(pkt) >= IPV4_MIN_HEADER:
            dst = pkt[16:20]
            peer = self.book.by_addr.get(IPv4Address(dst))
        else:
            self.stats["tx_malformed"] += 1
            return None
        if peer is None:
            peer = self.routes.lookup(dst)  # a subnet (or exit) route this node accepted
        if peer is None:
            self.stats["tx_no_route"] += 1
        return peer

    def peer_of_v6(self, addr: bytes) -> bytes | None:
        return self.v6_peers.get(addr) if is_overlay_v6(addr) else None

    def inbound(self, peer: bytes, pkt: bytes) -> bytes | None:
        """What to write to TUN for an IP packet from `peer`'s tunnel, or None (dropped, counted)."""
        st = self.stats
        kind = kind_of(pkt)
        if kind == KIND_IPV6:
            if len(pkt) < IPV6_HEADER:
                st["rx_malformed"] += 1
                return None
            if self.v6_peers.get(pkt[8:24]) != peer and not self.routes.source_ok(peer, pkt[8:24]):
                st["rx_spoofed_source"] += 1  # not the peer's own address, nor from a route accepted from it
                return None
            if pkt[24:40] != self.my_v6 and not self.routes.forwards(pkt[24:40]):
                st["rx_wrong_destination"] += 1  # beyond this node only into routes it advertises
                return None
            st["rx_ipv6"] += 1
            return pkt
        if kind == KIND_IPV4:
            if len(pkt) < IPV4_MIN_HEADER:
                st["rx_malformed"] += 1
                return None
            src, dst = pkt[12:16], pkt[16:20]
            if not self.routes.source_ok(peer, src):
                if self.routes.claimed(src):
                    st["rx_spoofed_source"] += 1  # posing as a host of a route that is not this peer's
                    return None
                try:
                    src = self.book.assign(peer).packed
                except AddressError:
                    st["rx_malformed"] += 1
                    return None
            out = rewrite_v4(pkt, src, dst if self.routes.forwards(dst) else self.my_v4)
            if out is None:
                st["rx_malformed"] += 1
                return None
            st["rx_ipv4"] += 1
            return out
        st["rx_malformed"] += 1
        return None

"""Inner packets longer than their tunnel's path allows (docs/PROTOCOL.md §10.4).

The node answers as a router on the path would: an IPv4 packet with DF set, or an IPv6 packet
over 1280 bytes, gets an ICMP "fragmentation needed" / ICMPv6 "packet too big" from the peer's
virtual address naming the inner MTU, so the sender's own path MTU discovery (TCP's included)
shrinks its packets for that one peer; an IPv4 packet without DF is fragmented here, as a router
would. IPv6 packets up to 1280 bytes must cross every IPv6 link, so on a path that carries less
(outer MTU under 1341 over IPv4, 1361 over IPv6) they are split into FRAG pieces that the peer's `Reassembly` joins
(an IPv6 tunnel link fragmenting below the IP layer, as RFC 8200 §5 asks). Pure.

    sends, reply = too_big(pkt, mtu, ident)   # tunnel `sends`; write `reply` (if any) to TUN
    pkt = clamp_mss(pkt, mtu)                 # a TCP SYN announces segments that fit `mtu`
    whole = reasm.add(piece, now)             # the peer: a joined packet, or None
"""

from __future__ import annotations

import struct

from ntm.overlay import FRAG, IPV4_MIN_HEADER, IPV6_HEADER, PROTO_TCP, adjust_checksum, ipv4_checksum
from ntm.vaddr import IPV6_MIN_MTU

#: Bytes of the offending packet quoted in an ICMPv4 error: RFC 1812 §4.3.2.3 (as much as fits
#: in 576 bytes with the new IP and ICMP headers).
ICMP4_QUOTE = 576 - IPV4_MIN_HEADER - 8
#: Bytes quoted in an ICMPv6 error: the whole error fits IPv6's minimum MTU (RFC 4443 §2.4).
ICMP6_QUOTE = IPV6_MIN_MTU - IPV6_HEADER - 8
#: The smallest MTU an IPv4 host accepts in "fragmentation needed" (RFC 791's 68, Linux clamps
#: higher); below it we would rather fragment.
IPV4_MIN_MTU = 68
HOP_LIMIT = 64
#: FRAG header: kind (1) || packet id (4) || index (1: bit 7 set on the last piece).
FRAG_HEADER = struct.Struct("!BIB")
FRAG_LAST = 0x80
#: Packets being joined per peer: a window of IPv6 TCP segments in flight; the oldest goes first.
REASM_MAX = 64
#: A packet whose pieces have not all come within this long is given up (a piece was lost; the
#: sender's transport retransmits the whole packet anyway).
REASM_TIMEOUT_S = 2.0
PROTO_ICMP, PROTO_ICMPV6 = 1, 58
_DF, _MF = 0x4000, 0x2000
TCP_HEADER, TCP_SYN, TCP_OPT_MSS = 20, 0x02, 2
#: Longest TCP SYN looked at: IPv6 40 + TCP 20 + the most options (40); longer packets are data.
SYN_MAX_LEN = IPV6_HEADER + TCP_HEADER + 40
_H = struct.Struct("!H")


def too_big(pkt: bytes, mtu: int, ident: int) -> tuple[list[bytes], bytes | None]:
    """(payloads to tunnel instead of `pkt`, ICMP error to deliver locally) for an inner packet
    longer than `mtu`. IPv6 never gets an MTU below 1280: up to 1280 bytes, `pkt` goes as FRAG
    pieces numbered `ident` (unique per peer among recent packets)."""
    version = pkt[0] >> 4 if pkt else 0
    if version == 4 and len(pkt) >= IPV4_MIN_HEADER:
        if _H.unpack_from(pkt, 6)[0] & _DF and mtu >= IPV4_MIN_MTU:
            return [], icmp4_frag_needed(pkt, mtu)
        return fragment_v4(pkt, mtu), None
    if version == 6 and len(pkt) >= IPV6_HEADER:
        if len(pkt) <= IPV6_MIN_MTU:
            return split(pkt, mtu, ident), None
        return [], icmp6_packet_too_big(pkt, max(mtu, IPV6_MIN_MTU))
    return [pkt], None


def icmp4_frag_needed(pkt: bytes, mtu: int) -> bytes:
    """ICMP type 3 code 4 (RFC 1191) from `pkt`'s destination to its source, next-hop MTU `mtu`."""
    body = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + pkt[:ICMP4_QUOTE]
    body = body[:2] + _H.pack(_checksum(body)) + body[4:]
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            IPV4_MIN_HEADER + len(body),
            0,
            0,
            HOP_LIMIT,
            PROTO_ICMP,
            0,
            pkt[16:20],
            pkt[12:16],
        )
    )
    header[10:12] = _H.pack(ipv4_checksum(bytes(header)))
    return bytes(header) + body


def icmp6_packet_too_big(pkt: bytes, mtu: int) -> bytes:
    """ICMPv6 Packet Too Big (RFC 4443 §3.2) from `pkt`'s destination to its source."""
    src, dst = pkt[24:40], pkt[8:24]
    body = struct.pack("!BBHI", 2, 0, 0, mtu) + pkt[:ICMP6_QUOTE]
    pseudo = src + dst + struct.pack("!I3xB", len(body), PROTO_ICMPV6)
    body = body[:2] + _H.pack(_checksum(pseudo + body)) + body[4:]
    return struct.pack("!IHBB", 6 << 28, len(body), PROTO_ICMPV6, HOP_LIMIT) + src + dst + body


def fragment_v4(pkt: bytes, mtu: int) -> list[bytes]:
    """`pkt` (IPv4, DF clear) cut into fragments of at most `mtu` bytes (RFC 791): each keeps the
    header, offsets count 8-byte units from the packet's own offset, MF on all but the last."""
    ihl = (pkt[0] & 0x0F) * 4
    total = _H.unpack_from(pkt, 2)[0]
    if ihl < IPV4_MIN_HEADER or not ihl < total <= len(pkt):
        return []  # not a well-formed packet: nothing a router would forward
    flags = _H.unpack_from(pkt, 6)[0]
    offset, more = flags & 0x1FFF, flags & _MF
    step = max((mtu - ihl) // 8 * 8, 8)
    out = []
    for start in range(ihl, total, step):
        chunk = pkt[start : min(start + step, total)]
        last = start + step >= total
        header = bytearray(pkt[:ihl])
        header[2:4] = _H.pack(ihl + len(chunk))
        header[6:8] = _H.pack((offset + (start - ihl) // 8) | (more if last else _MF))
        header[10:12] = b"\0\0"
        header[10:12] = _H.pack(ipv4_checksum(bytes(header)))
        out.append(bytes(header) + chunk)
    return out


def clamp_mss(pkt: bytes, mtu: int) -> bytes:
    """`pkt`, or if it is a TCP SYN whose MSS option allows segments longer than `mtu` (inner
    bytes), the same SYN announcing the MSS that fits, its checksum adjusted (RFC 1624). TCP then
    never needs the ICMP round, and IPv6 TCP fits a path below 1280 without being split."""
    version = pkt[0] >> 4 if pkt else 0
    if version == 4 and len(pkt) >= IPV4_MIN_HEADER and pkt[9] == PROTO_TCP and not _H.unpack_from(pkt, 6)[0] & 0x1FFF:
        ip_len = (pkt[0] & 0x0F) * 4
    elif version == 6 and len(pkt) >= IPV6_HEADER and pkt[6] == PROTO_TCP:
        ip_len = IPV6_HEADER
    else:
        return pkt
    if len(pkt) < ip_len + TCP_HEADER or not pkt[ip_len + 13] & TCP_SYN:
        return pkt
    end = min(ip_len + (pkt[ip_len + 12] >> 4) * 4, len(pkt))
    i = ip_len + TCP_HEADER
    while i + 1 < end and pkt[i] != 0:
        if pkt[i] == 1:  # NOP
            i += 1
            continue
        if pkt[i] == TCP_OPT_MSS and pkt[i + 1] == 4 and i + 4 <= end:
            limit = mtu - ip_len - TCP_HEADER
            old = pkt[i + 2 : i + 4]
            if _H.unpack(old)[0] <= limit or limit <= 0:
                return pkt
            new = _H.pack(limit)
            at = ip_len + 16  # the TCP checksum
            odd = (i - ip_len) % 2  # a value at an odd offset adds to the sum byte-swapped
            csum = adjust_checksum(_H.unpack_from(pkt, at)[0], old[::-1] if odd else old, new[::-1] if odd else new)
            return pkt[:at] + _H.pack(csum) + pkt[at + 2 : i + 2] + new + pkt[i + 4 :]
        if pkt[i + 1] < 2:
            return pkt  # a malformed option: leave the packet as it is
        i += pkt[i + 1]
    return pkt


def split(pkt: bytes, mtu: int, ident: int) -> list[bytes]:
    """`pkt` as FRAG payloads of at most `mtu` bytes each (at most 128 pieces)."""
    step = max(mtu - FRAG_HEADER.size, (len(pkt) + 127) // 128)
    starts = range(0, len(pkt), step)
    return [
        FRAG_HEADER.pack(FRAG, ident & 0xFFFFFFFF, i | (FRAG_LAST if start + step >= len(pkt) else 0))
        + pkt[start : start + step]
        for i, start in enumerate(starts)
    ]


class Reassembly:
    """Joins one peer's FRAG pieces (any order); bounded by REASM_MAX packets and REASM_TIMEOUT_S."""

    def __init__(self) -> None:
        self.pending: dict[int, list] = {}  # ident → [started, {index: piece}, count or None]
        self.dropped = 0  # pieces or packets given up (malformed, too old, evicted)

    def add(self, piece: bytes, now: float) -> bytes | None:
        """Add one FRAG payload; returns the whole packet once its last missing piece arrives.
        Old packets are given up when a new one starts (not on every piece: a stream's QUIC
        packets come in runs of pieces, §10.9)."""
        if len(piece) <= FRAG_HEADER.size:
            self.dropped += 1
            return None
        _, ident, index = FRAG_HEADER.unpack_from(piece)
        entry = self.pending.get(ident)
        if entry is None:
            for old in [k for k, v in self.pending.items() if now - v[0] > REASM_TIMEOUT_S]:
                del self.pending[old]
                self.dropped += 1
            if len(self.pending) >= REASM_MAX:
                del self.pending[next(iter(self.pending))]
                self.dropped += 1
            entry = self.pending[ident] = [now, {}, None]
        parts = entry[1]
        parts[index & ~FRAG_LAST] = piece[FRAG_HEADER.size :]
        if index & FRAG_LAST:
            entry[2] = (index & ~FRAG_LAST) + 1
        count = entry[2]
        if count is not None and len(parts) == count and all(i in parts for i in range(count)):
            del self.pending[ident]
            return b"".join(parts[i] for i in range(count))
        return None


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`, padded to even length."""
    return ipv4_checksum(data + b"\0" * (len(data) % 2))


def pieces(payload: bytes, mtu: int, ident: int) -> list[bytes]:
    """A tunnel payload as it goes out: whole if it fits `mtu`, else as FRAG pieces (a stream's
    QUIC packet larger than the path, §10.9)."""
    return [payload] if len(payload) <= mtu else split(payload, mtu, ident)

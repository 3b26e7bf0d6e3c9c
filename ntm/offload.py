"""TUN offloads: split the kernel's super-packets into segments, coalesce segments back into one.

With IFF_VNET_HDR and TUNSETOFFLOAD, the kernel reads out of TUN one TCP (or UDP) packet of up
to 64 KB ahead of a virtio-net header saying how to cut it (GSO), and takes such packets back.
The tunnel still carries one inner packet per datagram (per-packet AEAD, counters and replay
window unchanged, §10.4): `split` cuts a super-packet into the segments the kernel's own GSO
would have sent (each with complete checksums), no longer than the path's inner MTU, and
`coalesce` joins consecutive in-order segments of one TCP flow into a super-packet whose header
asks the receiving kernel to finish the checksum (the kernel's GRO does the same).

Everything here is pure: bytes in, bytes out; OffloadError for a header that does not describe
its packet. Header layout: include/uapi/linux/virtio_net.h (struct virtio_net_hdr, native
byte order on x86 and arm64, which is little-endian).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

from ntm.errors import NtmError

VNET_HDR_LEN = 10
F_NEEDS_CSUM = 1  # the checksum at csum_start + csum_offset holds only the pseudo-header sum
GSO_NONE, GSO_TCPV4, GSO_UDP_L4, GSO_TCPV6 = 0, 1, 5, 4
GSO_ECN = 0x80  # we never enable TUN_F_TSO_ECN, so the kernel never sets it
PROTO_TCP, PROTO_UDP = 6, 17
TCP_CSUM_AT, UDP_CSUM_AT = 16, 6
TCP_FIN, TCP_PSH, TCP_ACK, TCP_CWR = 0x01, 0x08, 0x10, 0x80
#: Longest packet one coalesced write may be (IPv4 total length / IPv6 payload length field).
MAX_COALESCED = 65535
_HDR = struct.Struct("<BBHHHH")
_H = struct.Struct("!H")
_I = struct.Struct("!I")
_NO_HDR = bytes(VNET_HDR_LEN)


class OffloadError(NtmError):
    """A virtio-net header that does not describe its packet (the kernel never sends one)."""


@dataclass(frozen=True, slots=True)
class VnetHdr:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return _HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset)

    @classmethod
    def unpack(cls, buf: bytes) -> VnetHdr:
        if len(buf) < VNET_HDR_LEN:
            raise OffloadError(f"virtio-net header truncated ({len(buf)} bytes)")
        return cls(*_HDR.unpack_from(buf))


NO_OFFLOAD = _NO_HDR  # the header of a packet written whole, checksums complete


def csum_sum(data: bytes | memoryview, initial: int = 0) -> int:
    """The ones'-complement sum of `data`'s big-endian 16-bit words plus `initial`, folded to 16
    bits (one big-integer reduction: 2**16 ≡ 1 mod 0xFFFF, so the sum of the words is the number
    mod 0xFFFF; a non-zero sum folds to 1..0xFFFF, never 0)."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = (int.from_bytes(data, "big") + initial) % 0xFFFF
    return s if s or not (initial or any(data)) else 0xFFFF


def _pseudo(pkt: bytes | memoryview, v6: bool, proto: int, length: int) -> int:
    """Unfolded sum of the pseudo-header (addresses, protocol, transport length)."""
    addrs = pkt[8:40] if v6 else pkt[12:20]
    return int.from_bytes(addrs, "big") % 0xFFFF + proto + length


def _is_v6(pkt: bytes | memoryview) -> bool:
    if not pkt:
        raise OffloadError("empty packet")
    version = pkt[0] >> 4
    if version not in (4, 6):
        raise OffloadError(f"not an IP packet (version {version})")
    return version == 6


def _ip_fix(head: bytearray, v6: bool, l3: int, total: int, id_step: int) -> None:
    """Set the IP length fields for a packet of `total` bytes; IPv4: ID + `id_step`, header checksum."""
    if v6:
        head[4:6] = _H.pack(total - 40)
        return
    head[2:4] = _H.pack(total)
    if id_step:
        head[4:6] = _H.pack((_H.unpack_from(head, 4)[0] + id_step) & 0xFFFF)
    head[10:12] = b"\0\0"
    head[10:12] = _H.pack(0xFFFF - csum_sum(memoryview(head)[:l3]))


def split(hdr: VnetHdr, pkt: bytes, max_len: int, partial: bool = False) -> list[bytes]:
    """The packets `pkt` stands for, as the kernel's GSO would send them, each with complete
    checksums: TCP cut into segments of at most `max_len` bytes (and no longer than the header's
    gso_size), sequence numbers advancing, IPv4 IDs counting up, FIN/PSH on the last only, CWR
    on the first only; UDP
    cut at gso_size (datagram boundaries are the application's: `max_len` cannot move them).

    `partial` (the peer's TUN finishes checksums, §10.11): each TCP/UDP checksum field holds only
    its pseudo-header sum, as the kernel's own partial checksums do; nothing sums the payload."""
    if hdr.gso_type == GSO_NONE:
        if hdr.flags & F_NEEDS_CSUM and not (partial and csum_at(pkt) == hdr.csum_start + hdr.csum_offset):
            return [complete_checksum(pkt, hdr.csum_start, hdr.csum_offset)]
        return [pkt]
    buf = memoryview(bytearray(pkt))
    return [bytes(buf[a:b]) for a, b in split_into(hdr, buf, 0, len(buf), max_len, partial)]


class Stretch(NamedTuple):
    """`count` consecutive full segments of a split_into whose headers are all `head` but for the
    TCP sequence number (big-endian at `seq_at` in `head`, `seq` for the first, growing by `size`):
    IPv6 with partial checksums, where nothing else changes. Segment k is `buf[at + k * size :
    at + (k + 1) * size + len(head)]` once `head` and its sequence number are written at its start
    (`cut` does it); a caller that seals them in a loop of its own writes them the same way, each
    only after the previous segment is sealed (its headers overwrite that segment's tail)."""

    at: int
    count: int
    size: int
    head: bytes
    seq_at: int
    seq: int

    def cut(self, buf: bytearray | memoryview) -> Iterator[tuple[int, int]]:
        """The stretch's segments as split_into yields them, headers written one at a time."""
        at, hl, seq = self.at, len(self.head), self.seq
        view = memoryview(buf)
        for _ in range(self.count):
            view[at : at + hl] = self.head
            _I.pack_into(buf, at + self.seq_at, seq)
            yield at, at + hl + self.size
            at += self.size
            seq = (seq + self.size) & 0xFFFFFFFF


class Cuts:
    """split_into's items, one of which a consumer may give back: the rest of a Stretch whose
    sealing stopped partway (keys used up), so the caller still has every segment not sent."""

    __slots__ = ("_items", "_back")

    def __init__(self, items: Iterator[tuple[int, int] | Stretch]) -> None:
        self._items = items
        self._back: tuple[int, int] | Stretch | None = None

    def __iter__(self) -> Cuts:
        return self

    def __next__(self) -> tuple[int, int] | Stretch:
        back = self._back
        if back is not None:
            self._back = None
            return back
        return next(self._items)

    def give_back(self, item: tuple[int, int] | Stretch) -> None:
        """`item` comes next (it was taken but not used; its segments are still intact)."""
        self._back = item


def flatten(segments: Iterable[tuple[int, int] | Stretch], buf: bytearray | memoryview) -> Iterator[tuple[int, int]]:
    """split_into's segments with each Stretch cut as it comes: (a, b) pairs only."""
    for item in segments:
        if type(item) is Stretch:
            yield from item.cut(buf)
        else:
            yield item  # type: ignore[misc]


def split_into(
    hdr: VnetHdr,
    buf: bytearray | memoryview,
    start: int,
    end: int,
    max_len: int,
    partial: bool = False,
    stretch: int = 0,
) -> Cuts:
    """split() of the GSO packet `buf[start:end]` done in place, as wireguard-go does: yields
    (a, b) for each segment in turn, the segment being `buf[a:b]`, its headers written just ahead
    of its payload, over the tail of the previous segment's payload. So a segment is valid only
    until the next is asked for: the caller uses it (encrypts it elsewhere, copies it) first. All
    segments but the last have one length (what UDP GSO needs); the last may be shorter.
    OffloadError (before anything is written) for a header that does not describe its packet.

    `stretch` (the segments one GSO send takes): IPv6 TCP segments with partial checksums that
    differ only in their sequence numbers come as a Stretch instead, never across a multiple of
    `stretch` segments (the caller's GSO runs), so its sealing loop writes them itself."""
    if hdr.gso_type & GSO_ECN or hdr.gso_type not in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4):
        raise OffloadError(f"unsupported GSO type {hdr.gso_type:#x}")
    pkt = memoryview(buf)[start:end]
    v6 = _is_v6(pkt)
    l4 = hdr.csum_start
    tcp = hdr.gso_type != GSO_UDP_L4
    if (hdr.gso_type == GSO_TCPV6) != v6 and tcp:
        raise OffloadError("GSO type does not match the IP version")
    if l4 < (40 if v6 else 20) or len(pkt) < l4 + (20 if tcp else 8):
        raise OffloadError(f"transport header at {l4} outside the {len(pkt)}-byte packet")
    hl = l4 + ((pkt[l4 + 12] >> 4) * 4 if tcp else 8)
    if hl > len(pkt) or (tcp and hl < l4 + 20):
        raise OffloadError("transport header longer than the packet")
    size = hdr.gso_size
    if size <= 0:
        raise OffloadError("GSO packet with gso_size 0")
    if tcp:
        size = min(size, max_len - hl)
        if size <= 0:
            raise OffloadError(f"headers ({hl} bytes) do not fit in {max_len}")
    partial = partial and l4 == (40 if v6 else (pkt[0] & 0x0F) * 4)
    return Cuts(_cut(buf, start, end, v6, l4, hl, tcp, size, partial, stretch if v6 and tcp and partial else 0))


def _cut(
    buf: bytearray | memoryview,
    start: int,
    end: int,
    v6: bool,
    l4: int,
    hl: int,
    tcp: bool,
    size: int,
    partial: bool,
    stretch: int,
) -> Iterator[tuple[int, int] | Stretch]:
    """split_into's loop, kept lean (it runs once per segment sent): the checksums are the sums of
    what every segment shares, computed once, plus what changes (length, sequence, flags, ID) and
    the segment's payload (one big-integer reduction each: 2**16 ≡ 1 mod 0xFFFF); `partial`: the
    pseudo-header sum only (addresses and protocol once, plus the segment's length)."""
    at = l4 + (TCP_CSUM_AT if tcp else UDP_CSUM_AT)
    base = bytearray(buf[start : start + hl])
    base[at : at + 2] = b"\0\0"
    flags = base[l4 + 13] if tcp else 0
    if tcp:
        seq0 = _I.unpack_from(base, l4 + 4)[0]
        base[l4 + 4 : l4 + 8] = bytes(4)
        base[l4 + 13] = 0
    else:
        seq0 = 0
        base[l4 + 4 : l4 + 6] = b"\0\0"
    ip_sum = id0 = 0
    if v6:
        base[4:6] = b"\0\0"
    else:
        id0 = _H.unpack_from(base, 4)[0]
        base[2:6] = bytes(4)
        base[10:12] = b"\0\0"
        ip_sum = int.from_bytes(base[:l4], "big") % 0xFFFF
    # The pseudo-header (addresses, protocol) and the transport header's unchanging words.
    pseudo = int.from_bytes(base[8:40] if v6 else base[12:20], "big") + (PROTO_TCP if tcp else PROTO_UDP)
    l4_sum = (pseudo + int.from_bytes(base[l4:], "big")) % 0xFFFF
    pseudo %= 0xFFFF
    # FIN and PSH on the last segment only, CWR on the first only (as tcp_gso_segment).
    cut_flags = flags & ~(TCP_FIN | TCP_PSH)
    base = bytes(base)
    view = memoryview(buf)
    n = end - start
    i, off = 0, hl
    pack_into, from_bytes = struct.pack_into, int.from_bytes
    mid = None  # partial: the headers of a full segment after the first; the next ones differ only in seq and ID
    while off < n:
        e = off + size
        if e >= n:
            e = n
        h = start + off - hl  # this segment's headers go just ahead of its payload
        if stretch and mid is not None and e < n:
            count = min((n - 1 - off) // size, stretch - i % stretch)  # full segments, within this run
            if count > 1:
                yield Stretch(h, count, size, mid, l4 + 4, (seq0 + off - hl) & 0xFFFFFFFF)
                i += count
                off += count * size
                continue
        if mid is not None and e < n:
            view[h : h + hl] = mid
            if tcp:
                pack_into("!I", buf, h + l4 + 4, (seq0 + off - hl) & 0xFFFFFFFF)
            if not v6:
                ident = (id0 + i) & 0xFFFF
                pack_into("!H", buf, h + 4, ident)
                pack_into("!H", buf, h + 10, 0xFFFF - ((ip_sum + hl + size + ident) % 0xFFFF or 0xFFFF))
            yield h, start + e
            i += 1
            off = e
            continue
        total = hl + e - off
        l4_len = total - l4
        view[h : h + hl] = base
        if partial:
            pack_into("!H", buf, h + at, (pseudo + l4_len) % 0xFFFF or 0xFFFF)
        else:
            x = from_bytes(view[start + off : start + e], "big")
            if (e - off) & 1:
                x <<= 8  # an odd last byte is the high half of a word padded with zero
        if tcp:
            seq = (seq0 + off - hl) & 0xFFFFFFFF
            f = cut_flags if e < n else flags
            if i:
                f &= ~TCP_CWR
            pack_into("!I", buf, h + l4 + 4, seq)
            buf[h + l4 + 13] = f
            if not partial:
                s = (l4_sum + x + l4_len + (seq >> 16) + (seq & 0xFFFF) + f) % 0xFFFF
                pack_into("!H", buf, h + at, 0xFFFF - (s or 0xFFFF))
        else:
            pack_into("!H", buf, h + l4 + 4, l4_len)
            if not partial:
                s = (l4_sum + x + 2 * l4_len) % 0xFFFF
                pack_into("!H", buf, h + at, (0xFFFF - (s or 0xFFFF)) or 0xFFFF)
        if v6:
            pack_into("!H", buf, h + 4, l4_len if l4 == 40 else total - 40)
        else:
            ident = (id0 + i) & 0xFFFF
            pack_into("!HH", buf, h + 2, total, ident)
            pack_into("!H", buf, h + 10, 0xFFFF - ((ip_sum + total + ident) % 0xFFFF or 0xFFFF))
        if partial and i == 1 and e < n:
            mid = bytes(view[h : h + hl])
        yield h, start + e
        i += 1
        off = e


def complete_checksum(pkt: bytes, csum_start: int, csum_offset: int) -> bytes:
    """`pkt` with the partial checksum at csum_start + csum_offset completed (the field holds the
    pseudo-header sum; the sum from csum_start on is added and complemented)."""
    at = csum_start + csum_offset
    if at + 2 > len(pkt) or csum_start < 20:
        raise OffloadError(f"checksum at {at} outside the {len(pkt)}-byte packet")
    initial = _H.unpack_from(pkt, at)[0]
    out = bytearray(pkt)
    out[at : at + 2] = b"\0\0"
    c = 0xFFFF - csum_sum(memoryview(out)[csum_start:], initial)
    if c == 0 and pkt[9 if pkt[0] >> 4 == 4 else 6] == PROTO_UDP:
        c = 0xFFFF
    out[at : at + 2] = _H.pack(c)
    return bytes(out)


def csum_at(pkt: bytes) -> int:
    """Where the TCP or UDP checksum of a packet that a receiver may finish is (an unfragmented
    IPv4 packet, or IPv6 without extension headers, whose length field matches; not IPv4 UDP
    without a checksum), else 0."""
    n = len(pkt)
    if n < 28:
        return 0
    version = pkt[0] >> 4
    if version == 4:
        l4 = (pkt[0] & 0x0F) * 4
        if l4 < 20 or pkt[6] & 0x3F or pkt[7] or _H.unpack_from(pkt, 2)[0] != n:
            return 0
        proto = pkt[9]
    elif version == 6 and n >= 48 and _H.unpack_from(pkt, 4)[0] == n - 40:
        l4, proto = 40, pkt[6]
    else:
        return 0
    at = l4 + (TCP_CSUM_AT if proto == PROTO_TCP else UDP_CSUM_AT if proto == PROTO_UDP else n)
    if at + 2 > n or (version == 4 and proto == PROTO_UDP and pkt[at : at + 2] == b"\0\0"):
        return 0
    return at


def finish_later(pkt: bytes) -> tuple[bytes, bytes]:
    """(virtio-net header, packet) to write `pkt` alone to an offloading TUN. A TCP or UDP packet
    gets the pseudo-header sum in its checksum field and NEEDS_CSUM: the kernel's checksum is
    right whatever the field held (complete, or partial from a peer that leaves checksums to this
    node, §10.11). Anything else (see csum_at) goes as it is."""
    at = csum_at(pkt)
    if not at:
        return NO_OFFLOAD, pkt
    v6 = pkt[0] >> 4 == 6
    l4 = 40 if v6 else (pkt[0] & 0x0F) * 4
    proto = pkt[6] if v6 else pkt[9]
    out = bytearray(pkt)
    out[at : at + 2] = _H.pack(csum_sum(b"", _pseudo(pkt, v6, proto, len(pkt) - l4)))
    return VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, l4, at - l4).pack(), bytes(out)


# --- coalescing (GRO) ---------------------------------------------------------------------------


class _Run:
    """Segments of one TCP flow joined so far."""

    __slots__ = (
        "head",
        "parts",
        "l4",
        "hl",
        "v6",
        "size",
        "next_seq",
        "id_step",
        "length",
        "limit",
        "ended",
        "same",
        "vary",
        "twin",
    )

    def __init__(self, pkt: bytes, l4: int, hl: int, v6: bool) -> None:
        self.head = pkt[:hl]
        self.parts = [memoryview(pkt)[hl:]]  # payloads, not copied until the write
        self.l4, self.hl, self.v6 = l4, hl, v6
        self.size = len(pkt) - hl
        self.next_seq = (_I.unpack_from(pkt, l4 + 4)[0] + self.size) & 0xFFFFFFFF
        self.id_step: int | None = None  # IPv4 IDs: counting up (1), or fixed with DF set (0)
        self.length = len(pkt)
        self.limit = MAX_COALESCED + (40 if v6 else 0)  # IPv6's length field leaves out its header
        self.ended = bool(pkt[l4 + 13] & TCP_PSH)  # (or, once taken, a segment shorter than the first)
        same, self.vary = _shape(v6, hl)
        self.same = (same.unpack_from, same.unpack_from(pkt))
        # IPv6: the headers before and after the sequence number, which a full segment of the flow
        # repeats byte for byte when its checksum is partial (the common case: take_many)
        self.twin = (pkt[: l4 + 4], pkt[l4 + 8 : hl]) if v6 else None

    def take(self, pkt: bytes) -> bool:
        """Append `pkt` if it is the next segment of this run's flow and joins it as the kernel's
        GRO would (what _can_join asks of a segment, checked here too): the same headers but for
        lengths, ID, sequence, PSH and checksums; no longer than the first. Two struct reads
        compare the headers (the common case, a run's next segment, costs no flow lookup)."""
        n, hl = len(pkt), self.hl
        size = n - hl
        if self.ended or size <= 0 or size > self.size or self.length + size > self.limit:
            return False
        same, fixed = self.same
        if same(pkt) != fixed:
            return False  # another flow, ack, window, options, TOS, TTL, DF...
        if self.v6:
            length, seq, flags = self.vary.unpack_from(pkt)
            if length != n - 40:
                return False
        else:
            length, ident, seq, flags = self.vary.unpack_from(pkt)
            if length != n:
                return False
            step = (ident - _H.unpack_from(self.head, 4)[0]) & 0xFFFF
            if self.id_step is None:
                if not (step == 1 or step == 0 and pkt[6] & 0x40):
                    return False
                self.id_step = step
            elif step != self.id_step * len(self.parts) & 0xFFFF:
                return False
        if seq != self.next_seq or flags & ~TCP_PSH != TCP_ACK:
            return False  # out of order, or SYN/FIN/RST/URG
        self.parts.append(memoryview(pkt)[hl:])
        self.next_seq = (seq + size) & 0xFFFFFFFF
        self.length += size
        if size < self.size:
            self.ended = True  # a short segment is the last GSO may cut
        if flags & TCP_PSH:
            self.ended = True
            head = bytearray(self.head)
            head[self.l4 + 13] |= TCP_PSH
            self.head = bytes(head)
        return True

    def take_many(self, pkts: list[bytes], i: int) -> int:
        """take() each of `pkts[i:]` in turn while it joins; returns the index of the first that
        does not. A full segment whose headers are the first's but for the sequence number (its
        twin: IPv6, partial checksums) is taken on two prefix comparisons, a strict case of take's
        rules; anything else (the last segment, shorter; PSH; complete checksums) gets take's."""
        end, twin = len(pkts), self.twin
        if twin is not None and not self.ended:
            pre, post = twin
            seq_at = self.l4 + 4
            full, hl, size, limit = self.size + self.hl, self.hl, self.size, self.limit
            seq, length, append = self.next_seq, self.length, self.parts.append
            while i < end:
                pkt = pkts[i]
                if (
                    len(pkt) != full
                    or length + size > limit
                    or not pkt.startswith(pre)
                    or not pkt.startswith(post, seq_at + 4)
                    or _I.unpack_from(pkt, seq_at)[0] != seq
                ):
                    break
                append(memoryview(pkt)[hl:])
                seq = (seq + size) & 0xFFFFFFFF
                length += size
                i += 1
            self.next_seq, self.length = seq, length
        while i < end and self.take(pkts[i]):
            i += 1
        return i

    def buffers(self) -> list[bytes | memoryview]:
        """The virtio-net header and the packet to write for this run, in pieces (one writev)."""
        if len(self.parts) == 1:
            return list(finish_later(self.head + self.parts[0]))
        l4, v6 = self.l4, self.v6
        head = bytearray(self.head)
        _ip_fix(head, v6, l4, self.length, 0)
        partial = csum_sum(b"", _pseudo(head, v6, PROTO_TCP, self.length - l4))
        head[l4 + TCP_CSUM_AT : l4 + TCP_CSUM_AT + 2] = _H.pack(partial)
        hdr = VnetHdr(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, self.hl, self.size, l4, TCP_CSUM_AT)
        return [hdr.pack(), bytes(head), *self.parts]


@functools.cache
def _shape(v6: bool, hl: int) -> tuple[struct.Struct, struct.Struct]:
    """Two struct formats for the segments of a run with `hl` bytes of IP and TCP headers (IPv4:
    no options): the fields every segment shares (a tuple compared once), and those it changes
    (IP length, IPv4 ID, sequence, TCP flags). The checksums are neither."""
    if v6:  # version..flow, [length], next header..ports, [seq], ack..offset, [flags], window, [csum], urgent..options
        return struct.Struct(f"!4s2x38s4x5sx2s2x{hl - 58}s"), struct.Struct("!4xH38xI5xB")
    # version..TOS, [length, ID], DF..protocol, [csum], addresses..ports, [seq], ack..offset, [flags], window, ...
    return struct.Struct(f"!2s4x4s2x12s4x5sx2s2x{hl - 38}s"), struct.Struct("!2xHH18xI5xB")


def _tcp_flow(pkt: bytes) -> tuple[bytes, int, bool] | None:
    """(flow key, transport offset, IPv6) of a TCP packet without extension headers, else None."""
    n = len(pkt)
    if n < 40:
        return None
    version = pkt[0] >> 4
    if version == 4:
        l4 = (pkt[0] & 0x0F) * 4
        if pkt[9] != PROTO_TCP or l4 < 20 or n < l4 + 20:
            return None
        return pkt[12:20] + pkt[l4 : l4 + 4], l4, False
    if version == 6 and n >= 60 and pkt[6] == PROTO_TCP:
        return pkt[8:40] + pkt[40:44], 40, True
    return None


def _can_join(pkt: bytes, l4: int, v6: bool) -> int:
    """The header length of a TCP segment that may be coalesced, else 0: no IP options, not a
    fragment, lengths that match, ACK (and PSH) only, a payload.

    Its checksum is not verified (the kernel trusts a coalesced packet's): every segment came
    through the tunnel's AEAD, so a wrong checksum can only be the peer's own, and a peer can
    put what it likes into its own connections anyway. Verifying cost a fifth of the receiver."""
    n = len(pkt)
    if v6:
        if _H.unpack_from(pkt, 4)[0] != n - 40:
            return 0
    elif l4 != 20 or pkt[6] & 0x3F or pkt[7] or _H.unpack_from(pkt, 2)[0] != n:
        return 0
    hl = l4 + (pkt[l4 + 12] >> 4) * 4
    if hl < l4 + 20 or hl >= n or pkt[l4 + 13] & ~TCP_PSH != TCP_ACK:
        return 0
    return hl


def coalesce(pkts: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(virtio-net header, packet) pairs to write for `pkts`: coalesce_buffers' writes, joined."""
    return [(bufs[0], b"".join(bufs[1:])) for bufs in coalesce_buffers(pkts)]


def coalesce_buffers(pkts: list[bytes]) -> list[list[bytes | memoryview]]:
    """The writes for `pkts` (each a virtio-net header and the packet's pieces), in order within each flow: runs of
    consecutive in-order segments of one TCP flow become one GSO packet; anything else (other
    protocols, out of order, SYN/FIN/RST/URG) goes alone (finish_later: the kernel completes
    TCP/UDP checksums, so a peer may leave them partial)."""
    c = Coalescer()
    for pkt in pkts:
        c.add(pkt)
    return c.writes()


class Coalescer:
    """coalesce_buffers one packet at a time, as they arrive (the data plane adds what one
    event-loop turn receives, then takes the writes)."""

    __slots__ = ("out", "open_runs", "last")

    def __init__(self) -> None:
        self.out: list[_Run | list[bytes | memoryview]] = []
        self.open_runs: dict[bytes, _Run] = {}
        self.last: _Run | None = None  # the run the previous packet joined or started

    def add(self, pkt: bytes) -> None:
        last = self.last  # the run the previous packet joined or started: its next segment joins it
        if last is not None and last.take(pkt):
            return
        self.last = None
        flow = _tcp_flow(pkt)
        hl = _can_join(pkt, flow[1], flow[2]) if flow is not None else 0
        if flow is None or not hl:
            if flow:
                self.open_runs.pop(flow[0], None)  # nothing of its flow may overtake it
            self.out.append(list(finish_later(pkt)))
            return
        key, l4, v6 = flow
        run = self.open_runs.get(key)
        if run is not None and run.hl == hl and run.take(pkt):
            self.last = run
            return
        run = self.last = self.open_runs[key] = _Run(pkt, l4, hl, v6)
        self.out.append(run)

    def writes(self) -> list[list[bytes | memoryview]]:
        """What to write, in order (each a virtio-net header and the packet's pieces, one writev)."""
        return [item.buffers() if isinstance(item, _Run) else item for item in self.out]

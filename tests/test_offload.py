"""TUN offloads (ntm/offload.py): super-packets split into the segments the kernel's GSO sends,
and segments coalesced into the super-packets the kernel's GRO builds.

The reference here is a model of the kernel written independently of the module: segments built
one by one from the flow's parameters (tcp_gso_segment / __udp_gso_segment: sequence numbers,
lengths, IPv4 IDs counting up, FIN/PSH on the last segment only, CWR on the first only, complete
checksums by RFC 1071 word sums) and the super-packet the kernel hands to TUN (headers of the
first segment, the flags of all, the pseudo-header sum in the checksum field, NEEDS_CSUM).
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntm.offload import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    NO_OFFLOAD,
    OffloadError,
    Stretch,
    VnetHdr,
    coalesce,
    complete_checksum,
    csum_at,
    csum_sum,
    finish_later,
    flatten,
    split,
    split_into,
)
from ntm.overlay import rewrite_v4

FIN, PSH, ACK, URG, CWR = 0x01, 0x08, 0x10, 0x20, 0x80
BIG = 65535  # a path that never makes split cut below the kernel's gso_size


def word_sum(data: bytes) -> int:
    """RFC 1071 one's-complement sum with end-around carry, word by word (the reference)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@dataclass
class Flow:
    v6: bool
    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    window: int
    options: bytes
    ip_id: int
    ip_opts: bytes  # IPv4 options (the kernel's TSO keeps them on every segment)
    ttl: int
    tos: int
    last_flags: int  # PSH and/or FIN on the super-packet: only its last segment keeps them
    first_flags: int  # CWR: only the first segment keeps it

    def ip_header(self, l4_len: int, proto: int, i: int) -> bytes:
        if self.v6:
            return (
                struct.pack("!IHBB", (6 << 28) | (self.tos << 20) | 0x12345, l4_len, proto, self.ttl)
                + self.src
                + self.dst
            )
        ihl = 20 + len(self.ip_opts)
        h = bytearray(
            struct.pack(
                "!BBHHHBBH4s4s",
                0x40 | ihl // 4,
                self.tos,
                ihl + l4_len,
                (self.ip_id + i) & 0xFFFF,
                0x4000,
                self.ttl,
                proto,
                0,
                self.src,
                self.dst,
            )
            + self.ip_opts
        )
        h[10:12] = struct.pack("!H", 0xFFFF - word_sum(bytes(h)))
        return bytes(h)

    def pseudo(self, proto: int, l4_len: int) -> bytes:
        if self.v6:
            return self.src + self.dst + struct.pack("!IxxxB", l4_len, proto)
        return self.src + self.dst + struct.pack("!xBH", proto, l4_len)

    def tcp_header(self, seq: int, flags: int, check: int) -> bytes:
        off = (20 + len(self.options)) // 4
        return (
            struct.pack(
                "!HHIIBBHHH", self.sport, self.dport, seq & 0xFFFFFFFF, self.ack, off << 4, flags, self.window, check, 0
            )
            + self.options
        )

    def segment(self, i: int, seq: int, flags: int, payload: bytes) -> bytes:
        l4_len = 20 + len(self.options) + len(payload)
        bare = self.tcp_header(seq, flags, 0) + payload
        check = 0xFFFF - word_sum(self.pseudo(6, l4_len) + bare)
        return self.ip_header(l4_len, 6, i) + self.tcp_header(seq, flags, check) + payload

    def kernel_segments(self, payload: bytes, mss: int) -> list[bytes]:
        chunks = [payload[o : o + mss] for o in range(0, len(payload), mss)]
        out = []
        for i, c in enumerate(chunks):
            flags = ACK | (self.first_flags if i == 0 else 0) | (self.last_flags if i == len(chunks) - 1 else 0)
            out.append(self.segment(i, self.seq + i * mss, flags, c))
        return out

    def kernel_super(self, payload: bytes, mss: int) -> tuple[VnetHdr, bytes]:
        """What a read from TUN returns for the same data (TSO): one packet, partial checksum."""
        th = 20 + len(self.options)
        l4_len = th + len(payload)
        partial = word_sum(self.pseudo(6, l4_len))
        pkt = (
            self.ip_header(l4_len, 6, 0)
            + self.tcp_header(self.seq, ACK | self.first_flags | self.last_flags, partial)
            + payload
        )
        l3 = 40 if self.v6 else 20 + len(self.ip_opts)
        return VnetHdr(F_NEEDS_CSUM, GSO_TCPV6 if self.v6 else GSO_TCPV4, l3 + th, mss, l3, 16), pkt

    def udp_datagrams(self, payload: bytes, size: int) -> list[bytes]:
        out = []
        for i, o in enumerate(range(0, len(payload), size)):
            c = payload[o : o + size]
            bare = struct.pack("!HHHH", self.sport, self.dport, 8 + len(c), 0) + c
            check = 0xFFFF - word_sum(self.pseudo(17, 8 + len(c)) + bare)
            out.append(self.ip_header(8 + len(c), 17, i) + bare[:6] + struct.pack("!H", check or 0xFFFF) + c)
        return out


def options() -> st.SearchStrategy[bytes]:
    """TCP options as a sender puts them: NOPs and a timestamp, or any bytes padded to 4."""
    ts = st.builds(
        lambda a, b: b"\x01\x01\x08\x0a" + struct.pack("!II", a, b),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    )
    return st.one_of(st.just(b""), ts, st.integers(1, 10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n)))


@st.composite
def flows(draw, v6: bool | None = None, ip_opts: bool = True) -> Flow:
    v6 = draw(st.booleans()) if v6 is None else v6
    n = 16 if v6 else 4
    return Flow(
        v6,
        draw(st.binary(min_size=n, max_size=n)),
        draw(st.binary(min_size=n, max_size=n)),
        draw(st.integers(0, 65535)),
        draw(st.integers(0, 65535)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 65535)),
        draw(options()),
        draw(st.integers(0, 65535)),
        b"" if v6 or not ip_opts else draw(st.sampled_from([b"", b"\x01\x01\x01\x00", bytes(8)])),
        draw(st.integers(1, 255)),
        draw(st.integers(0, 255)),
        draw(st.sampled_from([0, PSH, FIN, PSH | FIN])),
        draw(st.sampled_from([0, 0, CWR])),
    )


def trains(**kw):
    """A flow, its payload (one to ~45 segments) and the kernel's MSS."""
    return st.tuples(flows(**kw), st.integers(1, 40000), st.integers(536, 1460)).map(
        lambda t: (t[0], bytes((i * 7 + t[0].sport) & 0xFF for i in range(t[1])), t[2])
    )


@settings(max_examples=150, deadline=None)
@given(trains())
def test_split_gives_byte_for_byte_the_segments_the_kernel_sends(train):
    flow, payload, mss = train
    hdr, pkt = flow.kernel_super(payload, mss)
    assert split(hdr, pkt, BIG) == flow.kernel_segments(payload, mss)


@settings(max_examples=150, deadline=None)
@given(trains(), st.booleans(), st.integers(0, 900), st.integers(1, 64))
def test_split_into_with_stretches_cuts_the_same_segments(train, partial, shrink, per_send):
    """A super-packet cut in place with stretches (the sealing loop writes their headers) gives
    byte for byte the segments split() gives, partial checksums or not, any path MTU; a stretch
    never crosses a GSO send (a multiple of `per_send` segments) and only IPv6 TCP gets them."""
    flow, payload, mss = train
    hdr, pkt = flow.kernel_super(payload, mss)
    max_len = max(len(pkt) - len(payload) + 8, 1500 - shrink)
    want = split(hdr, pkt, max_len, partial)
    buf = bytearray(b"pad" + pkt)
    got, index, stretches = [], 0, 0
    for item in split_into(hdr, buf, 3, len(buf), max_len, partial, per_send):
        if isinstance(item, Stretch):
            assert flow.v6 and partial and item.count > 1 and index % per_send + item.count <= per_send
            stretches += 1
        for a, b in flatten([item], buf):
            got.append(bytes(buf[a:b]))  # each used before the next is cut (over its tail)
            index += 1
    assert got == want
    assert stretches or not (flow.v6 and partial and len(want) >= 5 and per_send >= 4)


@settings(max_examples=150, deadline=None)
@given(trains(ip_opts=False))
def test_coalesce_then_split_gives_the_same_segments(train):
    """What the receiver writes (coalesced, the kernel finishing checksums) stands for exactly the
    segments the sender's kernel produced; FIN and CWR keep their segments apart (as GRO does)."""
    flow, payload, mss = train
    segs = flow.kernel_segments(payload, mss)
    out = coalesce(segs)
    alone = int(len(segs) > 1 and flow.first_flags == CWR) + int(len(segs) > 1 and bool(flow.last_flags & FIN))
    assert len(out) == alone + (len(segs) > alone)
    again = []
    for raw, pkt in out:
        hdr = VnetHdr.unpack(raw)
        assert hdr.flags == F_NEEDS_CSUM  # the kernel finishes every checksum: a peer may leave them partial
        if hdr.gso_type:
            assert hdr.gso_size == mss and hdr.gso_type in (GSO_TCPV4, GSO_TCPV6)
        again += split(hdr, pkt, BIG)
    assert again == segs


@settings(max_examples=60, deadline=None)
@given(trains(), st.integers(0, 900))
def test_split_to_a_smaller_path_mtu_keeps_the_stream(train, shrink):
    """The peer's path carries less than the kernel's segments: split cuts shorter ones, each
    valid on its own, the same bytes in sequence; coalesced again, they split the same way."""
    flow, payload, mss = train
    hdr, pkt = flow.kernel_super(payload, mss)
    max_len = hdr.hdr_len + max(mss - shrink, 300)
    segs = split(hdr, pkt, max_len)
    assert all(len(s) <= max_len for s in segs)
    got = b""
    for s in segs:
        l3 = 40 if flow.v6 else (s[0] & 0xF) * 4
        assert word_sum(flow.pseudo(6, len(s) - l3) + s[l3:]) == 0xFFFF
        assert struct.unpack_from("!I", s, l3 + 4)[0] == (flow.seq + len(got)) & 0xFFFFFFFF
        got += s[hdr.hdr_len :]
    assert got == payload
    if not flow.ip_opts:
        assert [x for raw, p in coalesce(segs) for x in split(VnetHdr.unpack(raw), p, max_len)] == segs


@settings(max_examples=100, deadline=None)
@given(flows(), st.integers(1, 30000), st.integers(100, 1472))
def test_udp_super_packet_splits_into_the_kernels_datagrams(flow, length, size):
    payload = bytes(i & 0xFF for i in range(length))
    l3 = 40 if flow.v6 else 20 + len(flow.ip_opts)
    partial = word_sum(flow.pseudo(17, 8 + length))
    pkt = (
        flow.ip_header(8 + length, 17, 0) + struct.pack("!HHHH", flow.sport, flow.dport, 8 + length, partial) + payload
    )
    hdr = VnetHdr(F_NEEDS_CSUM, GSO_UDP_L4, l3 + 8, size, l3, 6)
    assert split(hdr, pkt, 1280) == flow.udp_datagrams(payload, size)


@settings(max_examples=100, deadline=None)
@given(trains(v6=False, ip_opts=False), st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4))
def test_ipv4_translation_path_segments_coalesce_and_split_intact(train, src, dst):
    """The receiver translates each IPv4 segment into its local 100.64 view (rewrite_v4, checksums
    adjusted incrementally), then coalesces: the result stands for the translated segments."""
    flow, payload, mss = train
    flow.last_flags &= ~FIN
    flow.first_flags = 0
    segs = [rewrite_v4(s, src, dst) for s in flow.kernel_segments(payload, mss)]
    out = coalesce(segs)
    assert len(out) == 1
    assert split(VnetHdr.unpack(out[0][0]), out[0][1], BIG) == segs


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 0x3FFFF))
def test_checksum_sum_matches_rfc1071(data, initial):
    s = word_sum(data) + initial
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    assert csum_sum(data, initial) == s


def simple_flow(v6: bool = False) -> Flow:
    n = 16 if v6 else 4
    return Flow(
        v6, bytes(range(1, n + 1)), bytes(range(2, n + 2)), 40000, 5201, 1000, 77, 512, b"", 9, b"", 64, 0, 0, 0
    )


# A change to one segment of a run: a header byte flipped (any, or one of the sequence number's),
# two neighbours swapped, or the segment cut short or made longer with its headers unchanged.
_CHANGES = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 60), st.integers(0, 80), st.integers(1, 255)),
    st.tuples(
        st.just("flip"), st.integers(0, 60), st.sampled_from([44, 45, 46, 47, 24, 25, 26, 27]), st.integers(1, 255)
    ),
    st.tuples(st.just("swap"), st.integers(0, 60), st.just(0), st.just(0)),
    st.tuples(st.just("cut"), st.integers(0, 60), st.integers(-8, 8).filter(bool), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(trains(ip_opts=False), st.booleans(), st.lists(_CHANGES, max_size=3))
def test_take_many_takes_what_take_takes_one_by_one(train, partial, changes):
    """Adversary: a peer's run whose segments (partial checksums or complete ones) may carry a
    changed header byte (another flow, source, window, flags, options, sequence number, length),
    come swapped, or be cut short or made longer under unchanged headers. The run's quick path for
    twins (_Run.take_many) stops where take() one by one stops, and leaves the run the same:
    payloads, next sequence number, length, end."""
    from ntm.offload import _Run, _can_join, _tcp_flow

    flow, payload, mss = train
    hdr, pkt = flow.kernel_super(payload, mss)
    segs = split(hdr, pkt, BIG, partial)
    for kind, index, at, xor in changes:
        i = index % len(segs)
        if kind == "swap" and i + 1 < len(segs):
            segs[i], segs[i + 1] = segs[i + 1], segs[i]
        elif kind == "flip":
            seg = bytearray(segs[i])
            seg[at % len(seg)] ^= xor
            segs[i] = bytes(seg)
        elif kind == "cut":
            segs[i] = segs[i][:at] if at < 0 else segs[i] + bytes(at)
    key = _tcp_flow(segs[0])
    hl = _can_join(segs[0], key[1], key[2]) if key is not None else 0
    if not hl:
        return
    one, many = _Run(segs[0], key[1], hl, key[2]), _Run(segs[0], key[1], hl, key[2])
    stop = 1
    while stop < len(segs) and one.take(segs[stop]):
        stop += 1
    assert many.take_many(segs, 1) == stop
    state = lambda r: ([bytes(p) for p in r.parts], r.next_seq, r.length, r.ended, r.head)  # noqa: E731
    assert state(many) == state(one)
    if flow.v6 and partial and not changes and len(segs) > 2:
        assert stop >= len(segs) - 1  # an honest run joins whole (FIN keeps the last apart)


def test_interleaved_flows_coalesce_apart_and_in_order():
    """Two flows' segments arrive interleaved (two connections sharing the tunnel)."""
    a, b = simple_flow(), simple_flow()
    b.sport = 40001
    sa, sb = a.kernel_segments(bytes(6000), 1000), b.kernel_segments(bytes(4000), 1000)
    mixed = [x for pair in zip(sa, sb) for x in pair] + sa[4:]
    out = coalesce(mixed)
    assert len(out) == 2
    assert [split(VnetHdr.unpack(r), p, BIG) for r, p in out] == [sa, sb]


def test_what_cannot_be_coalesced_goes_as_it_is():
    """Hostile or unusual input: out of order, a gap, SYN, URG, a pure ACK between segments, a
    non-TCP packet: each is written alone (the kernel judges it), nothing of its flow overtakes it."""
    f = simple_flow()
    segs = f.kernel_segments(bytes(5000), 1000)
    assert coalesce([segs[1], segs[0]]) == [finish_later(segs[1]), finish_later(segs[0])]
    assert [len(split(VnetHdr.unpack(r), p, BIG)) for r, p in coalesce([segs[0], segs[2], segs[3]])] == [1, 2]
    syn = f.segment(0, f.seq, 0x02 | ACK, b"x")
    urg = f.segment(1, f.seq + 1000, URG | ACK, bytes(1000))
    assert written(coalesce([segs[0], urg])) == [segs[0], urg]
    assert coalesce([syn]) == [finish_later(syn)]
    pure_ack = f.segment(0, f.seq, ACK, b"")
    assert written(coalesce([segs[0], pure_ack, segs[1]])) == [segs[0], pure_ack, segs[1]]
    udp = f.udp_datagrams(bytes(100), 100)[0]
    assert coalesce([udp]) == [finish_later(udp)]
    assert coalesce([b"", b"\x45"]) == [(NO_OFFLOAD, b""), (NO_OFFLOAD, b"\x45")]


@pytest.mark.parametrize("v6", [False, True])
def test_a_segment_that_differs_in_any_shared_header_byte_starts_a_new_write(v6):
    """Hostile or unusual input: a segment in sequence whose headers differ from its run's in one
    byte that every segment of a GSO packet shares (TOS or flow label, TTL, DF, addresses, ports,
    ack, header length, window, urgent pointer, options), or whose length field lies: it is never
    joined (the kernel would give it its run's header): it is written alone, and so is what follows."""
    f = simple_flow(v6)
    f.options = b"\x01\x01\x08\x0a" + bytes(range(8))
    segs = f.kernel_segments(bytes(3000), 1000)
    assert len(coalesce(segs)) == 1
    l4 = 40 if v6 else 20
    # the bytes a segment may change: IP length (and IPv4 ID, checksum), sequence, flags, checksum
    varies = {4, 5} if v6 else {2, 3, 4, 5, 10, 11}
    varies |= {l4 + 4, l4 + 5, l4 + 6, l4 + 7, l4 + 13, l4 + 16, l4 + 17}
    for i in sorted(set(range(l4 + 20 + len(f.options))) - varies):
        odd = bytearray(segs[1])
        odd[i] ^= 0x04
        assert len(coalesce([segs[0], bytes(odd), segs[2]])) == 3, i
    for at in (4,) if v6 else (2,):
        odd = bytearray(segs[1])
        odd[at + 1] ^= 0x04
        assert len(coalesce([segs[0], bytes(odd)])) == 2


def written(out: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The packets the receiving kernel makes of what coalesce writes (checksums finished)."""
    return [seg for raw, pkt in out for seg in split(VnetHdr.unpack(raw), pkt, BIG)]


def finished(pkt: bytes) -> bytes:
    """`pkt` with a partial TCP/UDP checksum completed, as the receiving kernel does (NEEDS_CSUM)."""
    at = csum_at(pkt)
    l4 = 40 if pkt[0] >> 4 == 6 else (pkt[0] & 0x0F) * 4
    return complete_checksum(pkt, l4, at - l4)


@settings(max_examples=150, deadline=None)
@given(trains(), st.integers(0, 900))
def test_partial_segments_finished_by_the_receiver_are_the_kernels(train, shrink):
    """A peer that finishes checksums (VIEW_CSUM) gets segments whose checksum field holds the
    pseudo-header sum only: completed (by its kernel, NEEDS_CSUM) they are the full-checksum
    segments byte for byte, at the kernel's MSS and at a smaller path's."""
    flow, payload, mss = train
    hdr, pkt = flow.kernel_super(payload, mss)
    max_len = hdr.hdr_len + max(mss - shrink, 300)
    partial = split(hdr, pkt, max_len, partial=True)
    full = split(hdr, pkt, max_len)
    l3 = 40 if flow.v6 else 20 + len(flow.ip_opts)
    for p, f in zip(partial, full, strict=True):
        assert struct.unpack_from("!H", p, l3 + 16)[0] == word_sum(flow.pseudo(6, len(p) - l3))
        assert finished(p) == f
        assert written([finish_later(p)]) == [f] == written([finish_later(f)])
    if not flow.ip_opts:
        assert written(coalesce(partial)) == full


@settings(max_examples=60, deadline=None)
@given(flows(), st.integers(1, 8000), st.integers(100, 1472))
def test_partial_udp_datagrams_finished_by_the_receiver_are_the_kernels(flow, length, size):
    payload = bytes(i & 0xFF for i in range(length))
    l3 = 40 if flow.v6 else 20 + len(flow.ip_opts)
    pkt = (
        flow.ip_header(8 + length, 17, 0)
        + struct.pack("!HHHH", flow.sport, flow.dport, 8 + length, word_sum(flow.pseudo(17, 8 + length)))
        + payload
    )
    hdr = VnetHdr(F_NEEDS_CSUM, GSO_UDP_L4, l3 + 8, size, l3, 6)
    assert [finished(p) for p in split(hdr, pkt, 1500, partial=True)] == flow.udp_datagrams(payload, size)


@settings(max_examples=100, deadline=None)
@given(trains(v6=False, ip_opts=False), st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4))
def test_ipv4_translation_of_partial_segments_is_finished_right(train, src, dst):
    """The receiver translates a partial segment (rewrite_v4 adjusts a field that is no checksum
    yet): what it writes still completes to the translation of the full-checksum segment."""
    flow, payload, mss = train
    hdr, pkt = flow.kernel_super(payload, mss)
    partial, full = split(hdr, pkt, BIG, partial=True), split(hdr, pkt, BIG)
    assert written(coalesce([rewrite_v4(p, src, dst) for p in partial])) == [rewrite_v4(f, src, dst) for f in full]


def test_partial_checksum_vector():
    """docs/PROTOCOL.md §10.11: an IPv6 TCP segment (fd00::1 → fd00::2, 4 payload bytes) as a peer
    that finishes checksums receives it, and the complete checksum its kernel computes."""
    pkt = bytes.fromhex(
        "60000000001806 40".replace(" ", "")
        + "fd000000000000000000000000000001"
        + "fd000000000000000000000000000002"
        + "04d2145100000001000000025018ffff"
        + "fa220000"
        + "74657374"
    )
    assert csum_at(pkt) == 56 and word_sum(pkt[8:40] + bytes.fromhex("0000001800000006")) == 0xFA22
    assert finished(pkt).hex()[112:116] == "b4c4"
    assert finish_later(pkt) == (VnetHdr(F_NEEDS_CSUM, 0, 0, 0, 40, 16).pack(), pkt)


def test_what_is_not_tcp_or_udp_or_has_no_checksum_is_written_as_it_is():
    """ICMP, fragments, IPv6 extension headers, IPv4 UDP without a checksum, lengths that do not
    match: the receiver cannot finish those, so it writes them whole (and a sender never leaves
    their checksums partial)."""
    f = simple_flow()
    seg = f.kernel_segments(b"hello", 1000)[0]
    frag = bytearray(seg)
    frag[6] = 0x20  # more fragments
    icmp = bytearray(seg)
    icmp[9] = 1
    udp0 = bytearray(f.udp_datagrams(bytes(10), 10)[0])
    udp0[26:28] = b"\0\0"
    for pkt in (bytes(frag), bytes(icmp), bytes(udp0), seg + b"x", seg[:-1]):
        assert finish_later(pkt) == (NO_OFFLOAD, pkt)
        hdr = VnetHdr(F_NEEDS_CSUM, 0, 0, 0, 20, 6 if pkt[9] == 17 else 16)
        assert split(hdr, pkt, 1280, partial=True) == split(hdr, pkt, 1280)


def test_fixed_ipv4_ids_with_df_coalesce_counting_ids_do_not_mix():
    f = simple_flow()
    segs = f.kernel_segments(bytes(3000), 1000)
    fixed = [f.segment(0, f.seq + 1000 * i, ACK, bytes(1000)) for i in range(3)]
    assert len(coalesce(fixed)) == 1
    assert len(coalesce([segs[0], segs[1], fixed[2]])) == 2


def test_a_run_stops_at_the_coalesced_size_limit():
    f = simple_flow(v6=True)
    segs = f.kernel_segments(bytes(1400 * 60), 1400)
    out = coalesce(segs)
    assert len(out) == 2 and all(len(p) - 40 <= 65535 for _, p in out)
    assert [s for r, p in out for s in split(VnetHdr.unpack(r), p, BIG)] == segs
    # the same from a peer's tunnel (partial checksums: the quick path for twins, _Run.take_many)
    from ntm.offload import _Run

    partial = []
    for _ in range(2):  # two super-packets' segments in a row, one stream
        hdr, pkt = f.kernel_super(bytes(1400 * 30), 1400)
        partial += split(hdr, pkt, BIG, True)
        f.seq += 1400 * 30
    hl = len(partial[0]) - 1400
    run = _Run(partial[0], 40, hl, True)
    assert run.take_many(partial, 1) == (65535 + 40 - len(partial[0])) // 1400 + 1 and run.length - 40 <= 65535


def test_gso_none_with_a_partial_checksum_is_completed():
    f = simple_flow()
    seg = f.kernel_segments(b"hello", 1000)[0]
    partial = bytearray(seg)
    partial[36:38] = struct.pack("!H", word_sum(f.pseudo(6, 25)))
    assert split(VnetHdr(F_NEEDS_CSUM, 0, 0, 0, 20, 16), bytes(partial), 1280) == [seg]
    assert split(VnetHdr(F_NEEDS_CSUM, 0, 0, 0, 20, 16), bytes(partial), 1280, partial=True) == [bytes(partial)]
    assert split(VnetHdr(), seg, 1280) == [seg]


@pytest.mark.parametrize(
    "hdr, pkt, why",
    [
        (VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 40, 0, 20, 16), None, "gso_size 0"),
        (VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 40, 1000, 5000, 16), None, "outside"),
        (VnetHdr(F_NEEDS_CSUM, GSO_TCPV6, 40, 1000, 20, 16), None, "IP version"),
        (VnetHdr(F_NEEDS_CSUM, 0x83, 40, 1000, 20, 16), None, "unsupported"),
        (VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16), b"\x00" * 60, "not an IP packet"),
        (VnetHdr(F_NEEDS_CSUM, 0, 0, 0, 20, 5000), None, "outside"),
        (VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16), b"", "empty"),
    ],
)
def test_headers_that_do_not_describe_their_packet_are_refused(hdr, pkt, why):
    """A header the kernel would never send: a clear error, no exception of another kind."""
    if pkt is None:
        pkt = simple_flow().kernel_super(bytes(3000), 1000)[1]
    with pytest.raises(OffloadError, match=why):
        split(hdr, pkt, 1280)
    with pytest.raises(OffloadError, match="do not fit"):
        split(*simple_flow().kernel_super(bytes(3000), 1000), 30)


def test_vnet_header_layout():
    hdr = VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 52, 1448, 20, 16)
    assert hdr.pack() == bytes([1, 1, 52, 0, 0xA8, 0x05, 20, 0, 16, 0])
    assert VnetHdr.unpack(hdr.pack() + b"rest") == hdr
    with pytest.raises(OffloadError):
        VnetHdr.unpack(b"\x01")


def test_tun_falls_back_to_a_plain_tun_when_the_kernel_refuses_offloads(monkeypatch):
    """An old kernel (no TUNSETOFFLOAD, or no USO): the TUN opens anyway, plain or TCP-only, and
    the refused descriptor is closed; --no-offload never asks."""
    from daemon import tun

    calls: list[tuple[str, int]] = []
    closed: list[int] = []
    fds = iter(range(100, 110))
    refuse: set[int] = set()

    def ioctl(fd: int, req: int, arg):
        calls.append(("iff", struct.unpack_from("H", arg, 16)[0]) if req == tun.TUNSETIFF else ("offload", arg))
        if req == tun.TUNSETOFFLOAD and arg in refuse:
            raise OSError(22, "Invalid argument")
        return b"ntm9".ljust(40, b"\0") if req == tun.TUNSETIFF else 0

    monkeypatch.setattr(tun.os, "open", lambda *a: next(fds))
    monkeypatch.setattr(tun.os, "close", closed.append)
    monkeypatch.setattr(tun.fcntl, "ioctl", ioctl)
    both = tun.TCP_OFFLOADS | tun.UDP_OFFLOADS
    assert tun._create("ntm9", True)[1:] == (b"ntm9".ljust(40, b"\0"), True, True)
    refuse.add(both)
    assert tun._create("ntm9", True)[2:] == (True, False)
    refuse.add(tun.TCP_OFFLOADS)
    calls.clear()
    fd, _, vnet, uso = tun._create("ntm9", True)
    assert (vnet, uso) == (False, False) and closed == [fd - 1]  # the offloading descriptor went
    assert calls == [
        ("iff", tun.IFF_TUN | tun.IFF_NO_PI | tun.IFF_VNET_HDR),
        ("offload", tun.TCP_OFFLOADS),
        ("iff", tun.IFF_TUN | tun.IFF_NO_PI),
    ]
    calls.clear()
    assert tun._create("ntm9", False)[2:] == (False, False)
    assert calls == [("iff", tun.IFF_TUN | tun.IFF_NO_PI)]  # --no-offload: plain flags, no offload request


def test_partial_checksums_only_to_a_peer_that_said_it_finishes_them():
    """The hostile condition is a receiver without offloads (or from before VIEW_CSUM): its kernel
    drops a TCP segment whose checksum is partial. Segments to a peer are partial only after its
    VIEW on the current tunnel had CSUM; a VIEW without it, or a new tunnel, brings complete ones
    back. This node's own VIEW says CSUM exactly when its TUN offloads."""
    from types import SimpleNamespace

    from node.dataplane import DataPlane
    from ntm.overlay import VIEW_CSUM, frame_view

    f = simple_flow(v6=True)
    hdr, pkt = f.kernel_super(bytes(range(256)) * 12, 1000)
    full = split(hdr, pkt, BIG)
    sent: list[bytes] = []
    peer, v4 = bytes(20), ipaddress.IPv4Address("100.64.0.2")
    channel = SimpleNamespace(
        inner_mtu=1400,
        closed=False,
        send_nowait=sent.append,
        send_segments=lambda buf, segments, per_send: sent.extend(bytes(buf[a:b]) for a, b in flatten(segments, buf)),
        set_receiver=lambda f, many=None: None,
    )
    overlay = SimpleNamespace(addresses=lambda p: (None, v4), outbound=lambda p: peer)
    node = SimpleNamespace(endpoint=SimpleNamespace(hold=lambda: None))
    dp = DataPlane(node=node, overlay=overlay, tun=SimpleNamespace(vnet=True))  # type: ignore[arg-type]
    tunnel = SimpleNamespace(peer=peer, channel=channel)
    dp.attach(tunnel)  # type: ignore[arg-type]
    assert sent == [frame_view(v4, ask=True, csum=True)] and sent[0][1] == 1 | VIEW_CSUM
    assert sent[0].hex() == "060364400002"  # the vector of PROTOCOL §10.12

    def segments_after(view: bytes | None) -> list[bytes]:
        if view is not None:
            dp._from_tunnel(peer, tunnel, view)  # type: ignore[arg-type]
        sent.clear()
        dp.from_tun_vnet(memoryview(bytearray(hdr.pack() + pkt)))
        return list(sent)

    assert segments_after(None) == full  # no VIEW yet
    partial = segments_after(frame_view(v4, ask=False, csum=True))
    assert partial != full and [finished(p) for p in partial] == full
    assert segments_after(frame_view(v4, ask=False)) == full
    segments_after(frame_view(v4, ask=False, csum=True))
    old, tunnel = tunnel, SimpleNamespace(peer=peer, channel=channel)
    dp.attach(tunnel)  # type: ignore[arg-type]  # a new tunnel: the peer may have restarted without offloads
    assert segments_after(None) == full
    dp._from_tunnel(peer, old, frame_view(v4, ask=False, csum=True))  # type: ignore[arg-type]  # late, on the old one
    assert segments_after(None) == full


async def test_a_run_from_the_tunnel_is_checked_per_packet_and_written_coalesced():
    """Adversary: a peer slips a packet with a source address not its own, and a VIEW, between
    the segments of one GRO read; another peer sends the next segment of the first peer's flow (its
    addresses, in order). The read reaches the data plane in one call (the many-receiver it gives
    its tunnel): the overlay sees the run's first segment and every packet that does not continue
    it from the same peer (the forged one and the other peer's are dropped there); a segment that
    continues it (the same addresses, which the overlay passed for this peer) joins without asking
    again, and is counted as the overlay would. The VIEW is acted on, and the segments left reach
    TUN as one coalesced write."""
    from types import SimpleNamespace

    from node.dataplane import DataPlane
    from ntm.overlay import frame_view

    f = simple_flow(v6=True)
    segs = f.kernel_segments(bytes(5000), 1000)
    forged = bytearray(segs[1])
    forged[8] ^= 1  # another source address
    peer, other, v4 = bytes(20), bytes(19) + b"\1", ipaddress.IPv4Address("100.64.0.2")
    receivers: list = []
    channel = SimpleNamespace(
        inner_mtu=1400, closed=False, send_nowait=lambda p: None, set_receiver=lambda f, m=None: receivers.append(m)
    )
    checked: list[bytes] = []

    def inbound(p: bytes, pkt: bytes) -> bytes | None:
        checked.append(pkt)
        return pkt if p == peer and pkt[8:24] == f.src else None

    overlay = SimpleNamespace(addresses=lambda p: (None, v4), inbound=inbound, stats={"rx_ipv6": 0})
    writes: list[list] = []
    tun = SimpleNamespace(vnet=True, write_buffers=lambda bufs: writes.append([bytes(b) for b in bufs]))
    dp = DataPlane(node=SimpleNamespace(), overlay=overlay, tun=tun)  # type: ignore[arg-type]
    dp.attach(SimpleNamespace(peer=peer, channel=channel))  # type: ignore[arg-type]
    dp.attach(SimpleNamespace(peer=other, channel=channel))  # type: ignore[arg-type]
    receivers[0]([segs[0], frame_view(v4, ask=False), segs[1], bytes(forged), segs[2], segs[3]])
    receivers[1]([segs[4]])
    await asyncio.sleep(0)
    assert checked == [segs[0], bytes(forged), segs[4]] and overlay.stats["rx_ipv6"] == 3
    assert dp.seen_as[peer] == v4
    assert len(writes) == 1 and written([(w[0], b"".join(w[1:])) for w in writes]) == segs[:4]


async def test_ipv4_segments_from_the_tunnel_each_go_through_the_overlay():
    """Condition: the IPv4 translation path (§10.2). A run of IPv4 holds translated headers, so its
    segments never skip the overlay (which translates and counts each), even where translation
    leaves the addresses as they were; they still reach TUN as one coalesced write."""
    from types import SimpleNamespace

    from node.dataplane import DataPlane

    segs = simple_flow().kernel_segments(bytes(4000), 1000)
    peer, v4 = bytes(20), ipaddress.IPv4Address("100.64.0.2")
    receivers: list = []
    channel = SimpleNamespace(
        inner_mtu=1400, closed=False, send_nowait=lambda p: None, set_receiver=lambda f, m=None: receivers.append(m)
    )
    checked: list[bytes] = []
    overlay = SimpleNamespace(
        addresses=lambda p: (None, v4), inbound=lambda p, pkt: checked.append(pkt) or pkt, stats={}
    )
    writes: list[list] = []
    tun = SimpleNamespace(vnet=True, write_buffers=lambda bufs: writes.append([bytes(b) for b in bufs]))
    dp = DataPlane(node=SimpleNamespace(), overlay=overlay, tun=tun)  # type: ignore[arg-type]
    dp.attach(SimpleNamespace(peer=peer, channel=channel))  # type: ignore[arg-type]
    receivers[-1](segs)
    await asyncio.sleep(0)
    assert checked == segs and overlay.stats == {}
    assert len(writes) == 1 and written([(w[0], b"".join(w[1:])) for w in writes]) == segs

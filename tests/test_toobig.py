"""Inner packets too big for their tunnel's path (ntm/toobig.py): the ICMP errors a router would
send, and IPv4 fragmentation, checked field by field and by their checksums."""

from __future__ import annotations

import ipaddress
import os
import struct
from collections import deque

from ntm.overlay import frame_view, ipv4_checksum
from ntm.toobig import REASM_MAX, REASM_TIMEOUT_S, Reassembly, fragment_v4, icmp6_packet_too_big, split, too_big

SRC4, DST4 = ipaddress.IPv4Address("100.64.0.1").packed, ipaddress.IPv4Address("100.64.0.2").packed
SRC6 = ipaddress.IPv6Address("fd6e:746d:1::1").packed
DST6 = ipaddress.IPv6Address("fd6e:746d:2::2").packed


def v4(payload: bytes, df: bool, proto: int = 6, ident: int = 0x1234) -> bytes:
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000 if df else 0, 64, proto, 0, SRC4, DST4)
    )
    header[10:12] = struct.pack("!H", ipv4_checksum(bytes(header)))
    return bytes(header) + payload


def v6(payload: bytes) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), 6, 64) + SRC6 + DST6 + payload


def fold_ok(data: bytes) -> bool:
    """A block whose checksum field is right sums to 0xFFFF (RFC 1071)."""
    return ipv4_checksum(data + b"\0" * (len(data) % 2)) == 0


def test_ipv4_with_df_gets_fragmentation_needed_from_the_peer_address():
    pkt = v4(os.urandom(1399), df=True)
    sends, reply = too_big(pkt, 1339, 1)
    assert sends == [] and reply is not None
    assert reply[9] == 1 and reply[12:16] == DST4 and reply[16:20] == SRC4 and fold_ok(reply[:20])
    icmp = reply[20:]
    assert icmp[:2] == b"\x03\x04" and struct.unpack("!H", icmp[6:8])[0] == 1339 and fold_ok(icmp)
    assert icmp[8:] == pkt[:548] and len(reply) <= 576


def test_ipv4_without_df_is_fragmented_and_reassembles():
    payload = os.urandom(2999)
    pkt = v4(payload, df=False)
    frags, reply = too_big(pkt, 1339, 1)
    assert reply is None and len(frags) == 3
    got = bytearray()
    for i, f in enumerate(frags):
        assert len(f) <= 1339 and fold_ok(f[:20])
        flags = struct.unpack("!H", f[6:8])[0]
        assert (flags & 0x1FFF) * 8 == len(got)
        assert bool(flags & 0x2000) == (i < len(frags) - 1)
        assert struct.unpack("!H", f[2:4])[0] == len(f) and f[4:6] == pkt[4:6]
        got += f[20:]
    assert bytes(got) == payload
    # A fragment fragmented again keeps its offset and, on its last piece, its MF flag
    again = fragment_v4(frags[0], 600)
    assert all(struct.unpack("!H", f[6:8])[0] & 0x2000 for f in again)
    assert b"".join(f[20:] for f in again) == frags[0][20:]


def test_ipv6_gets_packet_too_big_never_below_1280():
    pkt = v6(os.urandom(1379))
    for mtu, said in ((1339, 1339), (1199, 1280)):
        sends, reply = too_big(pkt, mtu, 1)
        assert sends == [] and reply is not None
        assert reply[6] == 58 and reply[8:24] == DST6 and reply[24:40] == SRC6 and len(reply) <= 1280
        icmp = reply[40:]
        assert icmp[0] == 2 and struct.unpack("!I", icmp[4:8])[0] == said
        pseudo = DST6 + SRC6 + struct.pack("!I3xB", len(icmp), 58)
        assert fold_ok(pseudo + icmp)
        assert struct.unpack("!H", reply[4:6])[0] == len(icmp)


def test_ipv6_up_to_1280_is_split_where_the_path_is_smaller_and_joined_in_any_order():
    """IPv6's floor: a 1280-byte packet must cross any IPv6 link, so where the tunnel's inner MTU
    is smaller (1219 on a 1280 path over IPv4) it goes as FRAG pieces that fit, joined at the peer
    whatever their order."""
    pkt = v6(os.urandom(1240))
    pieces, reply = too_big(pkt, 1219, 7)
    assert reply is None and len(pieces) == 2 and all(len(p) <= 1219 and p[0] == 0x03 for p in pieces)
    r = Reassembly()
    assert r.add(pieces[1], 0.0) is None
    assert r.add(pieces[0], 0.1) == pkt and not r.pending
    # Wire vector (docs/PROTOCOL.md §10.4): kind 0x03, id u32, index (bit 7: last), then the bytes
    assert [p.hex() for p in split(bytes(range(6)), 10, 0x01020304)] == ["03010203040000010203", "0301020304810405"]


def test_reassembly_is_bounded_and_refuses_garbage():
    """Hostile peer: pieces that never complete, duplicates, and runts. The table stays bounded
    (REASM_MAX packets, REASM_TIMEOUT_S each) and nothing half-joined is ever delivered."""
    r = Reassembly()
    for i in range(REASM_MAX * 3):
        assert r.add(split(v6(bytes(1200)), 700, i)[0], 0.0) is None
    assert len(r.pending) == REASM_MAX and r.dropped == 2 * REASM_MAX
    assert r.add(b"\x03\x00", 0.0) is None and r.add(b"", 0.0) is None
    last = split(v6(bytes(1200)), 700, 10**6)[1]
    assert r.add(last, REASM_TIMEOUT_S + 1) is None and len(r.pending) == 1  # the stale ones expired


def test_malformed_inner_packets_change_nothing():
    assert too_big(b"", 1300, 1) == ([b""], None)
    assert too_big(b"\x45" + bytes(10), 1300, 1) == ([b"\x45" + bytes(10)], None)
    bad = bytearray(v4(os.urandom(100), df=False))
    bad[2:4] = struct.pack("!H", 5000)  # claims more than it has
    assert fragment_v4(bytes(bad), 60) == []
    assert icmp6_packet_too_big(v6(b"x" * 2000), 1400)[40] == 2


def tcp(ip: str, flags: int, options: bytes, mss_first: bool = True) -> bytes:
    """A TCP segment (no data) in IPv4 or IPv6 with a correct checksum."""
    doff = (20 + len(options)) // 4
    seg = bytearray(struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, doff << 4, flags, 65535, 0, 0) + options)
    if ip == "v6":
        pseudo = SRC6 + DST6 + struct.pack("!I3xB", len(seg), 6)
        seg[16:18] = struct.pack("!H", ipv4_checksum(pseudo + bytes(seg)))
        return struct.pack("!IHBB", 6 << 28, len(seg), 6, 64) + SRC6 + DST6 + bytes(seg)
    pseudo = SRC4 + DST4 + struct.pack("!BBH", 0, 6, len(seg))
    seg[16:18] = struct.pack("!H", ipv4_checksum(pseudo + bytes(seg)))
    return v4(bytes(seg), df=True)


def tcp_ok(pkt: bytes) -> bool:
    if pkt[0] >> 4 == 6:
        seg = pkt[40:]
        return fold_ok(pkt[8:24] + pkt[24:40] + struct.pack("!I3xB", len(seg), 6) + seg)
    seg = pkt[20:]
    return fold_ok(pkt[12:16] + pkt[16:20] + struct.pack("!BBH", 0, 6, len(seg)) + seg)


MSS_1360 = struct.pack("!BBH", 2, 4, 1360)
OTHER_OPTS = bytes([4, 2, 8, 10]) + bytes(8) + bytes([1, 3, 3, 7])  # SACK-permitted, timestamps, NOP, WS


def test_syn_mss_is_clamped_to_the_path_with_a_valid_checksum():
    """A SYN announcing MSS 1360 through a path whose inner MTU is 1219 (1280 over IPv4) announces
    1159 over IPv6 and 1179 over IPv4 afterwards, at an even or an odd option offset, and its
    checksum stays right; everything else passes unchanged."""
    from ntm.toobig import clamp_mss

    for ip, limit in (("v6", 1219 - 60), ("v4", 1219 - 40)):
        for opts in (MSS_1360 + OTHER_OPTS, bytes([1]) + MSS_1360 + OTHER_OPTS[:-1]):
            syn = tcp(ip, 0x02, opts)
            assert tcp_ok(syn)
            out = clamp_mss(syn, 1219)
            at = (40 if ip == "v6" else 20) + 20 + opts.index(MSS_1360) + 2
            assert struct.unpack("!H", out[at : at + 2])[0] == limit and tcp_ok(out), (ip, opts)
            assert len(out) == len(syn)
        synack = tcp(ip, 0x12, MSS_1360 + OTHER_OPTS)
        assert tcp_ok(clamp_mss(synack, 1219)) and clamp_mss(synack, 1219) != synack
        assert clamp_mss(synack, 1500) == synack  # already fits
        ack = tcp(ip, 0x10, OTHER_OPTS)
        assert clamp_mss(ack, 1219) == ack
    broken = tcp("v6", 0x02, bytes([5, 0, 0, 0]) + MSS_1360)  # an option of length 0
    assert clamp_mss(broken, 1219) == broken
    assert clamp_mss(b"", 1219) == b"" and clamp_mss(v6(b"x"), 1219) == v6(b"x")


async def test_packets_that_waited_for_the_tunnel_are_clamped_and_fitted():
    """The SYN that opens a tunnel waits while it comes up; when it goes out it must announce an
    MSS that fits the new tunnel's path (known at once where the node's own uplink is small), and
    a waiting packet longer than the path carries is answered as from TUN, not sent to be lost."""
    from types import SimpleNamespace

    from node.dataplane import DataPlane

    sent: list[bytes] = []
    channel = SimpleNamespace(
        inner_mtu=1219, closed=False, send_nowait=sent.append, set_receiver=lambda f, many=None: None
    )
    peer = bytes(20)
    view = (
        None,
        ipaddress.IPv4Address("100.64.0.2"),
    )  # the overlay's addresses for the peer: the VIEW sent after the packets
    dp = DataPlane(node=None, overlay=SimpleNamespace(addresses=lambda p: view), tun=None)  # type: ignore[arg-type]
    syn = tcp("v6", 0x02, MSS_1360 + OTHER_OPTS)
    dp.pending[peer] = deque([syn, v6(b"x" * 1300)])
    dp.attach(SimpleNamespace(peer=peer, channel=channel))  # type: ignore[arg-type]
    assert len(sent) == 2 and tcp_ok(sent[0]) and sent[1] == frame_view(view[1], ask=True)
    assert struct.unpack("!H", sent[0][60 + 2 : 60 + 4])[0] == 1219 - 60
    assert dp.stats["too_big"] == 1

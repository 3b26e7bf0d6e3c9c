"""The overlay's pure rules (ntm/vaddr.py, ntm/overlay.py), the DNS responder's answers
(node/dns.py) and the peer book: virtual addresses, translation, cryptokey routing."""

from __future__ import annotations

import ipaddress
import struct

import dns.flags
import dns.message
import dns.rcode
import pytest
from hypothesis import given, strategies as st

from node.dns import answer, from_this_node
from node.peers import PeerBook, PeerBookError
from ntm import keys
from ntm.overlay import (
    APP,
    KIND_APP,
    KIND_IPV4,
    KIND_IPV6,
    KIND_JUNK,
    KIND_VIEW,
    Overlay,
    adjust_checksum,
    frame_app,
    frame_view,
    ipv4_checksum,
    kind_of,
    parse_view,
    rewrite_v4,
)
from ntm.vaddr import AddressError, V4Book, tun_mtu, v6_of

ID_A = bytes.fromhex("f4f9ae416f3d3c274fc181e3b957cbdf5a13b1c5")
ID_B = bytes.fromhex("5bd8429a699cd5437a34ce6c07ae540ffa4c0f3d")
ID_C = bytes.fromhex("0123456789abcdef0123456789abcdef01234567")


# --- addresses ---------------------------------------------------------------------------------
def test_vectors_v6_address_and_mtu():
    """PROTOCOL §10.1 vectors: the prefix, then the node ID's first 96 bits."""
    assert str(v6_of(ID_A)) == "fd6e:746d:f4f9:ae41:6f3d:3c27:4fc1:81e3"
    assert str(v6_of(ID_B)) == "fd6e:746d:5bd8:429a:699c:d543:7a34:ce6c"
    assert tun_mtu(1500) == 1419 and tun_mtu(1361) == 1280
    with pytest.raises(AddressError):
        tun_mtu(1360)  # below IPv6's minimum inside


def test_v4_book_is_injective_stable_and_bounded():
    book = V4Book(ipaddress.IPv4Network("100.64.0.0/29"))  # .1 own, .2-.6 peers, .7 broadcast
    assert str(book.own) == "100.64.0.1"
    got = [book.assign(bytes([i]) * 20) for i in range(5)]
    assert [str(a) for a in got] == [f"100.64.0.{i}" for i in range(2, 7)]
    assert book.assign(bytes([0]) * 20) == got[0]  # the same peer keeps its address
    with pytest.raises(AddressError):
        book.assign(b"\x09" * 20)  # pool exhausted: refused, never shared
    again = V4Book.load(book.net, book.dump())
    assert again.by_peer == book.by_peer
    told = []
    again.on_assign = lambda peer, addr: told.append((peer, str(addr)))
    again.assign(bytes([0]) * 20)  # loaded: nothing new to persist
    again.by_addr.pop(again.by_peer.pop(bytes([4]) * 20))
    again.assign(b"\x07" * 20)
    assert told == [(b"\x07" * 20, "100.64.0.6")]  # only a new address is announced
    with pytest.raises(AddressError):  # a file that gives one address to two peers is refused
        V4Book.load(book.net, {"0x" + "11" * 20: "100.64.0.2", "0x" + "22" * 20: "100.64.0.2"})
    with pytest.raises(AddressError):
        V4Book.load(book.net, {"0x" + "11" * 20: "100.64.0.1"})  # our own address


# --- packets -----------------------------------------------------------------------------------
def ipv4(src: str, dst: str, proto: int, l4: bytes, frag: int = 0) -> bytes:
    total = 20 + len(l4)
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            total,
            1,
            frag,
            64,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
    )
    hdr[10:12] = struct.pack("!H", ipv4_checksum(bytes(hdr)))
    return bytes(hdr) + l4


def l4_checksum(src: bytes, dst: bytes, proto: int, seg: bytes) -> int:
    pseudo = src + dst + struct.pack("!BBH", 0, proto, len(seg))
    data = pseudo + seg + (b"\0" if len(seg) % 2 else b"")
    return ipv4_checksum(data)


def tcp(src: str, dst: str, payload: bytes) -> bytes:
    seg = bytearray(struct.pack("!HHIIBBHHH", 40000, 22, 1, 0, 0x50, 0x18, 65535, 0, 0) + payload)
    c = l4_checksum(ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed, 6, bytes(seg))
    seg[16:18] = struct.pack("!H", c)
    return ipv4(src, dst, 6, bytes(seg))


def valid_l4(pkt: bytes) -> bool:
    """A received TCP/UDP checksum verifies when the sum over pseudo-header and segment is 0xFFFF."""
    seg = pkt[20:]
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, pkt[9], len(seg))
    data = pseudo + seg + (b"\0" if len(seg) % 2 else b"")
    return ipv4_checksum(data) == 0


@given(st.binary(min_size=0, max_size=300), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_translation_keeps_tcp_and_ip_checksums_valid(payload, src, dst):
    pkt = tcp("100.64.0.1", "100.64.0.9", payload)
    new_src, new_dst = struct.pack("!I", src), struct.pack("!I", dst)
    out = rewrite_v4(pkt, new_src, new_dst)
    assert out[12:16] == new_src and out[16:20] == new_dst and out[20:] != b"" and len(out) == len(pkt)
    assert ipv4_checksum(out[:20]) == 0  # header checksum verifies
    assert valid_l4(out)


def test_udp_zero_checksum_stays_zero_and_fragments_keep_l4():
    udp = struct.pack("!HHHH", 5353, 53, 8 + 4, 0) + b"abcd"
    out = rewrite_v4(ipv4("100.64.0.1", "100.64.0.5", 17, udp), b"\x01\x02\x03\x04", b"\x05\x06\x07\x08")
    assert out[26:28] == b"\0\0"  # "no checksum" is not turned into a wrong one
    frag = ipv4("100.64.0.1", "100.64.0.5", 6, b"x" * 24, frag=3)  # a later fragment: no TCP header
    out = rewrite_v4(frag, b"\x01\x02\x03\x04", b"\x05\x06\x07\x08")
    assert out[20:] == frag[20:] and ipv4_checksum(out[:20]) == 0


def test_adjust_checksum_rfc1624_vector():
    # RFC 1624 §4: HC = 0xDD2F, m = 0x5555 → m' = 0x3285 gives HC' = 0x0000.
    assert adjust_checksum(0xDD2F, b"\x55\x55", b"\x32\x85") == 0x0000


@pytest.mark.parametrize(
    "bad", [b"", b"\x45" + b"\0" * 10, ipv4("1.1.1.1", "2.2.2.2", 6, b"")[:19], b"\x4f" + b"\0" * 40]
)
def test_rewrite_refuses_malformed(bad):
    assert rewrite_v4(bad, b"\0" * 4, b"\0" * 4) is None


def test_payload_kinds():
    assert kind_of(frame_app(b"hi")) == KIND_APP and frame_app(b"hi")[0] == APP
    assert kind_of(b"\x45rest") == KIND_IPV4 and kind_of(b"\x60rest") == KIND_IPV6
    assert kind_of(b"") == KIND_JUNK
    assert kind_of(b"\x15") == KIND_JUNK


def test_view_payload_vector_and_junk():
    """PROTOCOL §10.2 VIEW: 0x06 || flags || IPv4. A malformed one is not a view (it is counted as
    junk by the receiver), and unknown flag bits are ignored."""
    assert frame_view(ipaddress.IPv4Address("100.64.0.7"), ask=True).hex() == "060164400007"
    assert frame_view(ipaddress.IPv4Address("100.64.0.7"), ask=False).hex() == "060064400007"
    assert kind_of(bytes.fromhex("060164400007")) == KIND_VIEW
    assert parse_view(bytes.fromhex("060164400007")) == (ipaddress.IPv4Address("100.64.0.7"), True)
    assert parse_view(bytes.fromhex("06fe64400007")) == (ipaddress.IPv4Address("100.64.0.7"), False)
    for bad in ("0601644000", "06016440000700", "06", "050164400007"):
        assert parse_view(bytes.fromhex(bad)) is None, bad


class Pipe:
    """One end of a tunnel between two data planes, in memory: what one sends, the other's receiver
    gets (queued until it attaches, as node/channel.py's Inbox does); `lose` drops what is sent."""

    def __init__(self) -> None:
        self.closed, self.lose, self.sent = False, False, []
        self.other: Pipe | None = None
        self.receiver = None
        self.queue: list[bytes] = []

    def set_receiver(self, callback, many=None) -> None:  # (one at a time: `many` unused)
        self.receiver = callback
        while self.queue:
            callback(self.queue.pop(0))

    def send_nowait(self, data: bytes) -> None:
        self.sent.append(data)
        if not self.lose:
            self.other.receiver(data) if self.other.receiver else self.other.queue.append(data)


def test_each_node_learns_the_ipv4_address_its_peer_gives_it():
    """IPv4 addresses are per machine (§10.2), so `ntm status` shows where each peer sees this
    node, as the peer says over the tunnel (VIEW). A and B give each other different addresses;
    each learns the other's choice, a lost VIEW is asked for again when status looks, and a peer
    sending garbage as a VIEW changes nothing (counted as junk)."""
    from types import SimpleNamespace

    from node.dataplane import DataPlane

    ov_a, ov_b = Overlay(ID_A, V4Book()), Overlay(ID_B, V4Book())
    ov_b.addresses(ID_C)  # B met C first: A is B's second peer
    a, b = DataPlane(None, ov_a, None), DataPlane(None, ov_b, None)  # type: ignore[arg-type]
    pa, pb = Pipe(), Pipe()
    pa.other, pb.other = pb, pa
    pa.lose = True  # A's first VIEW (with its question) is lost
    ta, tb = SimpleNamespace(peer=ID_B, channel=pa), SimpleNamespace(peer=ID_A, channel=pb)
    a.attach(ta)  # type: ignore[arg-type]
    b.attach(tb)  # type: ignore[arg-type]
    assert str(ov_a.book.by_peer[ID_B]) == "100.64.0.2" and str(ov_b.book.by_peer[ID_A]) == "100.64.0.3"
    assert a.seen_as == {ID_B: ipaddress.IPv4Address("100.64.0.3")}  # B asked and A answered... into the loss
    assert b.seen_as == {}
    pa.lose = False
    assert a.view_of(ID_B, ta)["ipv4"] == "100.64.0.3"  # known: nothing sent
    assert b.view_of(ID_A, tb) == {"ipv6": str(v6_of(ID_B)), "ipv4": None}  # unknown: asked again
    assert b.view_of(ID_A, tb) == {"ipv6": str(v6_of(ID_B)), "ipv4": "100.64.0.2"}
    assert len(pb.sent) == 2  # its question at attach, and once more when status looked
    pa.send_nowait(b"\x06\x01\x0a")
    assert b.seen_as[ID_A] == ipaddress.IPv4Address("100.64.0.2") and b.stats["junk_rx"] == 1


# --- routing -----------------------------------------------------------------------------------
def ipv6(src: bytes, dst: bytes, payload: bytes = b"\x80\0\0\0\0\x07\0\x01") -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), 58, 64) + src + dst + payload


def overlay_of(me: bytes) -> Overlay:
    ov = Overlay(me, V4Book())
    for peer in (ID_A, ID_B, ID_C):
        if peer != me:
            ov.addresses(peer)
    return ov


def test_outbound_finds_the_peer_by_address_only_if_known():
    ov = overlay_of(ID_A)
    assert ov.outbound(ipv6(v6_of(ID_A).packed, v6_of(ID_B).packed)) == ID_B
    assert ov.outbound(ipv4("100.64.0.1", str(ov.book.by_peer[ID_C]), 1, b"\x08\0\0\0")) == ID_C
    stranger = bytes(20)
    assert ov.outbound(ipv6(v6_of(ID_A).packed, v6_of(stranger).packed)) is None
    assert ov.outbound(ipv6(v6_of(ID_A).packed, ipaddress.IPv6Address("ff02::2").packed)) is None
    assert ov.stats["tx_no_route"] == 2
    assert ov.outbound(b"\x45\0") is None and ov.stats["tx_malformed"] == 1


def test_inbound_cryptokey_routing_drops_spoofed_sources_and_foreign_destinations():
    ov = overlay_of(ID_A)
    me, b, c = v6_of(ID_A).packed, v6_of(ID_B).packed, v6_of(ID_C).packed
    good = ipv6(b, me)
    assert ov.inbound(ID_B, good) == good
    assert ov.inbound(ID_B, ipv6(c, me)) is None  # B claims C's address
    assert ov.inbound(ID_B, ipv6(bytes(16), me)) is None  # or any other
    assert ov.stats["rx_spoofed_source"] == 2
    assert ov.inbound(ID_B, ipv6(b, c)) is None  # B asks us to forward to C: never
    assert ov.stats["rx_wrong_destination"] == 1
    assert ov.inbound(ID_B, good[:39]) is None and ov.stats["rx_malformed"] == 1
    assert ov.stats["rx_ipv6"] == 1


def test_inbound_ipv4_is_translated_to_the_senders_local_address():
    """Whatever source and destination B writes, A's applications see B's address in A's book
    and A's own address: a peer cannot pose as another over IPv4 either."""
    ov = overlay_of(ID_A)
    pkt = tcp("100.64.0.1", "100.64.0.77", b"data")  # B's own view: it is .1, A is .77
    out = ov.inbound(ID_B, pkt)
    assert out[12:16] == ov.book.by_peer[ID_B].packed and out[16:20] == ov.book.own.packed
    assert valid_l4(out) and ipv4_checksum(out[:20]) == 0
    forged = tcp(str(ov.book.by_peer[ID_C]), "100.64.0.1", b"x")  # B writes C's address as source
    assert ov.inbound(ID_B, forged)[12:16] == ov.book.by_peer[ID_B].packed


def test_v6_collision_is_refused_not_misrouted():
    ov = Overlay(ID_A, V4Book())
    twin = ID_B[:12] + b"\xff" * 8  # same first 96 bits as B, another node
    ov.learn(ID_B)
    with pytest.raises(AddressError):
        ov.learn(twin)
    assert ov.outbound(ipv6(v6_of(ID_A).packed, v6_of(ID_B).packed)) == ID_B
    assert ov.inbound(twin, ipv6(v6_of(ID_B).packed, v6_of(ID_A).packed)) is None  # twin cannot use it
    assert ov.stats["addr_collisions"] == 1


# --- DNS ---------------------------------------------------------------------------------------
def resolver(label: str):
    table = {"bob": ID_B, ID_B.hex(): ID_B, "0x" + ID_B.hex(): ID_B}
    peer = table.get(label)
    return (v6_of(peer), ipaddress.IPv4Address("100.64.0.2")) if peer else None


def ask(name: str, rdtype: str) -> dns.message.Message:
    return dns.message.from_wire(answer(dns.message.make_query(name, rdtype).to_wire(), resolver))


def test_dns_answers_names_and_refuses_the_rest():
    r = ask("bob.ntm", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert [x.to_text() for x in r.answer[0]] == [str(v6_of(ID_B))]
    assert [x.to_text() for x in ask("BOB.ntm.", "A").answer[0]] == ["100.64.0.2"]
    assert ask(f"0x{ID_B.hex().upper()}.ntm", "AAAA").answer  # node IDs are case-insensitive
    assert ask("bob.ntm", "MX").rcode() == dns.rcode.NOERROR and not ask("bob.ntm", "MX").answer
    assert ask("carol.ntm", "A").rcode() == dns.rcode.NXDOMAIN
    assert ask("x.bob.ntm", "A").rcode() == dns.rcode.NXDOMAIN
    assert ask("example.com", "A").rcode() == dns.rcode.REFUSED
    assert answer(b"\x00" * 5, resolver) is None  # not DNS: no answer at all
    assert answer(b"\x00" * 600, resolver) is None  # oversized
    response = dns.message.make_response(dns.message.make_query("bob.ntm", "A")).to_wire()
    assert answer(response, resolver) is None  # a response is never answered (no loops)


def test_dns_answers_only_this_nodes_own_applications():
    """Issue 29 item 9: a LAN neighbour routing to our TUN address, or a peer through its tunnel
    (its overlay source), gets nothing; loopback and our own overlay addresses (what the kernel
    picks when an application here asks the TUN address) are answered."""
    own = {"100.64.0.1", str(v6_of(ID_A))}
    assert all(
        from_this_node(ip, own)
        for ip in ("127.0.0.1", "127.0.0.53", "::1", "100.64.0.1", str(v6_of(ID_A)), "::ffff:127.0.0.1")
    )
    assert not any(
        from_this_node(ip, own)
        for ip in ("192.168.1.20", "100.64.0.2", str(v6_of(ID_B)), "fe80::1%eth0", "not an address")
    )


def test_a_name_lookup_persists_nothing_and_is_bounded():
    """Issue 29 item 9: random `<id>.ntm` lookups get addresses in memory only (peers.json does not
    grow), at most LOOKED_UP_MAX of them; a peer later heard from (assign that keeps) is
    persisted then."""
    from ntm import vaddr

    book, told = V4Book(), []
    book.on_assign = lambda peer, addr: told.append(peer)
    ov = Overlay(ID_A, book)
    strangers = [bytes([9, i // 256, i % 256]) + b"\0" * 17 for i in range(vaddr.LOOKED_UP_MAX)]
    for peer in strangers:
        ov.addresses(peer, keep=False)
    assert book.dump() == {} and told == []
    with pytest.raises(AddressError):
        ov.addresses(b"\x0a" * 20, keep=False)
    assert len(ov.v6_peers) == vaddr.LOOKED_UP_MAX  # nothing learned for the refused one
    v4 = book.assign(strangers[0])  # heard from (an inbound packet): now kept
    assert told == [strangers[0]] and book.dump() == {"0x" + strangers[0].hex(): str(v4)}
    assert ov.addresses(ID_B)[1] and ID_B in told  # a peer in the book: kept as before


# --- peer book ---------------------------------------------------------------------------------
def test_peer_book_aliases_and_damage(tmp_path):
    book = PeerBook()
    book.set_alias("Bob", ID_B)
    book.allow.add(ID_C)
    book.v4 = {"0x" + ID_B.hex(): "100.64.0.2"}
    book.save(tmp_path)
    again = PeerBook.load(tmp_path)
    assert again.resolve("bob") == ID_B and again.allow == {ID_C} and again.v4 == book.v4
    assert again.resolve(keys.checksum(ID_C)) == ID_C
    assert again.names_of(ID_B) == ["bob"]
    for bad in ("0xabc", "has space", "-x", "a" * 64):
        with pytest.raises(PeerBookError):
            book.set_alias(bad, ID_B)
    with pytest.raises(PeerBookError):
        again.resolve("carol")
    (tmp_path / "peers.json").write_text('{"aliases": {"x": "not an id"}}')
    with pytest.raises(PeerBookError):
        PeerBook.load(tmp_path)

"""Routes a node offers and uses (ntm/routes.py, PROTOCOL §10.10): signed offers, the route
table (longest prefix, only what was offered AND accepted), and the overlay's cryptokey routing
widened by exactly those routes. Pure, no I/O."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Network, ip_address

import msgspec
import pytest

from daemon.forwarding import STATE_FILE, Forwarding, ForwardingError, forwarding_rules
from node.subnet import EXIT_TABLE, RouteSync
from ntm import keys, messages
from ntm.overlay import Overlay
from ntm.routes import (
    EXIT_ROUTES,
    RouteError,
    RouteTable,
    offer_digest,
    parse_choice,
    parse_prefixes,
    sign_offer,
    verify_offer,
)
from ntm.vaddr import V4Book, v6_of

from tests.fakes import FakeClock
from tests.test_overlay import ipv4, ipv6, l4_checksum

KEY_R = keys.private_key(bytes.fromhex("11" * 32))
KEY_S = keys.private_key(bytes.fromhex("22" * 32))
ID_R, ID_S = keys.node_id_of(KEY_R), keys.node_id_of(KEY_S)
ID_N = bytes.fromhex("0123456789abcdef0123456789abcdef01234567")
SEQ = 1764633600000
LAN = "10.77.0.0/24"


def a(text: str) -> bytes:
    return ip_address(text).packed


def offer(key=KEY_R, routes: str = LAN, exit: bool = False, seq: int = SEQ) -> messages.RouteOffer:
    return sign_offer(key, parse_prefixes(routes), exit, seq)


# --- offers ------------------------------------------------------------------------------------
def test_offer_vector():
    """PROTOCOL §10.10 vector: key 0x11…11 offers 10.77.0.0/24 and fd00:77::/64 at seq 1764633600000."""
    nets = parse_prefixes("10.77.0.0/24,fd00:77::/64")
    assert (
        offer_digest(ID_R, SEQ, nets, False).hex() == "3d906e8ae3e3f92227646e77cd58e3b9c64ff4c1083c6b15a8a7452f0d17b475"
    )
    o = sign_offer(KEY_R, nets, False, SEQ)
    assert o.sig == (
        "6088185dc27a8e78b47fca58a305aaafbca6df094661383e35eb4d8c56943ee1"
        "003077d71f03da76102ca848ba0b9493529587979032de32002d3e5a3350c0691b"
    )
    v = verify_offer(messages.decode(messages.RouteOffer, msgspec.json.encode(o)))
    assert v.node == ID_R and v.routes == tuple(nets) and not v.exit


@pytest.mark.parametrize(
    "change",
    [
        {"routes": ["10.0.0.0/8"]},  # widened by whoever carried it (the DC)
        {"exit": True},  # turned into an exit offer
        {"seq": SEQ + 1},  # replayed as newer
        {"node": keys.checksum(ID_S)},  # claimed for another node
    ],
)
def test_a_tampered_offer_is_refused(change):
    """Adversary: the DC (or anyone on the way) alters a node's offer; the signature no longer holds."""
    with pytest.raises(RouteError):
        verify_offer(msgspec.structs.replace(offer(), **change))


@pytest.mark.parametrize(
    "text, why",
    [
        ("10.77.0.1/24", "host bits"),
        ("0.0.0.0/0", "advertise-exit"),
        ("fd6e:746d::/48", "never routed"),  # the overlay's own addresses
        ("127.0.0.0/8", "never routed"),
        ("169.254.0.0/16", "never routed"),
        ("fe80::/64", "never routed"),
        ("224.0.0.0/8", "never routed"),
        ("10.0.0.0/33", "route"),
        ("banana", "route"),
        (",".join(f"10.{i}.0.0/16" for i in range(17)), "at most 16"),
    ],
)
def test_bad_prefixes_are_refused_with_a_reason(text, why):
    with pytest.raises(RouteError, match=why):
        parse_prefixes(text)


def test_a_non_canonical_signed_offer_is_refused():
    """A node (or its DC) lists a prefix twice: the offer is refused, not silently normalised."""
    o = offer()
    twice = msgspec.structs.replace(o, routes=[LAN, LAN])
    with pytest.raises(RouteError, match="canonical"):
        verify_offer(twice)


def test_too_many_routes_are_refused_at_parse():
    body = msgspec.to_builtins(offer())
    body["routes"] = [f"10.{i}.0.0/16" for i in range(17)]
    with pytest.raises(Exception, match="RouteOffer"):
        messages.decode(messages.RouteOffer, body)


# --- the table ----------------------------------------------------------------------------------
def table_with(*offers: messages.RouteOffer, wanted=None, exit_node=None, advertised: str = "") -> RouteTable:
    t = RouteTable(parse_prefixes(advertised), local=IPv4Network("100.64.0.0/10"))
    t.choose(wanted if wanted is not None else {ID_R: None}, exit_node)
    for o in offers:
        t.learn(verify_offer(o))
    return t


def test_longest_prefix_and_only_accepted_routes():
    """R offers 10.77.0.0/16 and S the /24 inside it; both accepted: the /24 goes to S."""
    t = table_with(offer(KEY_R, "10.77.0.0/16,10.9.0.0/24"), offer(KEY_S, LAN), wanted={ID_R: None, ID_S: None})
    assert t.lookup(a("10.77.0.5")) == ID_S
    assert t.lookup(a("10.77.1.5")) == ID_R
    assert t.lookup(a("10.9.0.200")) == ID_R
    assert t.lookup(a("10.10.0.1")) is None
    assert t.lookup(a("8.8.8.8")) is None  # no exit chosen


def test_routes_not_chosen_or_not_offered_are_not_used():
    """The user chose only R's 10.77.0.0/24; R offers more, and S offers something nobody chose."""
    t = table_with(
        offer(KEY_R, LAN + ",10.9.0.0/24", exit=True),
        offer(KEY_S, "10.50.0.0/24"),
        wanted={ID_R: frozenset(parse_prefixes(LAN + ",10.60.0.0/24"))},
    )
    assert t.accepted == {ID_R: tuple(parse_prefixes(LAN))}
    assert t.lookup(a("10.9.0.1")) is None  # offered, not chosen
    assert t.lookup(a("10.50.0.1")) is None  # S is not a peer whose routes we use
    assert t.lookup(a("1.1.1.1")) is None  # R is an exit, but not ours
    assert not t.source_ok(ID_R, a("10.9.0.1")) and t.source_ok(ID_R, a("10.77.0.9"))


def test_exit_node_only_when_chosen_and_offered():
    t = table_with(offer(KEY_R, exit=True), wanted={}, exit_node=ID_R)
    assert t.lookup(a("1.1.1.1")) == ID_R and t.lookup(ip_address("2001:db8::1").packed) == ID_R
    assert t.lookup(a("10.77.0.1")) == ID_R  # via the default route, not its subnet (not chosen)
    assert not t.claimed(a("1.1.1.1"))  # a default route claims nobody's address
    assert table_with(offer(KEY_R), wanted={}, exit_node=ID_R).lookup(a("1.1.1.1")) is None  # not offered


def test_newer_offer_replaces_older_and_a_replay_changes_nothing():
    """Adversary: a DC serves an older offer (a route since withdrawn) after the newer one."""
    t = table_with(offer(seq=SEQ + 10, routes="10.9.0.0/24"))
    assert not t.learn(verify_offer(offer(seq=SEQ)))
    assert t.lookup(a("10.77.0.1")) is None and t.lookup(a("10.9.0.1")) == ID_R
    assert t.learn(verify_offer(offer(seq=SEQ + 20)))  # withdrawn 10.9, back to 10.77
    assert t.lookup(a("10.9.0.1")) is None and t.lookup(a("10.77.0.1")) == ID_R


def test_conflicts_are_refused_and_reported():
    """Two peers offer the same prefix (one is used, the same one every time); a peer offers our
    own LAN or something inside our virtual network: not accepted."""
    t = table_with(
        offer(KEY_R, LAN + ",100.64.0.0/24,10.1.0.0/24"),
        offer(KEY_S, LAN),
        wanted={ID_R: None, ID_S: None},
        advertised="10.1.0.0/16",
    )
    owner = min(ID_R, ID_S)
    assert t.lookup(a("10.77.0.1")) == owner
    assert set(t.refused) == {LAN, "100.64.0.0/24", "10.1.0.0/24"}
    assert t.lookup(a("100.64.0.7")) is None and t.lookup(a("10.1.0.1")) is None


def test_forwards_only_advertised_and_never_own_virtual_network():
    t = RouteTable(parse_prefixes(LAN), local=IPv4Network("100.64.0.0/10"))
    assert t.forwards(a("10.77.0.3")) and not t.forwards(a("10.78.0.3"))
    ex = RouteTable([], exit_offered=True, local=IPv4Network("100.64.0.0/10"))
    assert ex.forwards(a("1.1.1.1")) and not ex.forwards(a("100.64.0.2"))


# --- the overlay with routes --------------------------------------------------------------------
def udp(src: str, dst: str) -> bytes:
    seg = bytearray(b"\x9c\x40\x00\x35\x00\x0c\x00\x00data")
    seg[6:8] = l4_checksum(a(src), a(dst), 17, bytes(seg)).to_bytes(2, "big")
    return ipv4(src, dst, 17, bytes(seg))


def node_n() -> Overlay:
    """N uses R's 10.77.0.0/24 and S's 10.50.0.0/24; knows R, S and a third peer C."""
    ov = Overlay(
        ID_N, V4Book(), table_with(offer(KEY_R), offer(KEY_S, "10.50.0.0/24"), wanted={ID_R: None, ID_S: None})
    )
    for p in (ID_R, ID_S, bytes(20)):
        ov.addresses(p)
    return ov


def test_outbound_to_a_routed_subnet_goes_to_its_router():
    ov = node_n()
    assert ov.outbound(udp("100.64.0.1", "10.77.0.5")) == ID_R
    assert ov.outbound(udp("100.64.0.1", "10.50.0.5")) == ID_S
    assert ov.outbound(udp("100.64.0.1", "10.99.0.5")) is None and ov.stats["tx_no_route"] == 1


def test_inbound_from_the_router_keeps_the_routed_source():
    """H (10.77.0.5) answers through R: N's applications see H's own address, checksum intact."""
    ov = node_n()
    out = ov.inbound(ID_R, udp("10.77.0.5", "100.64.0.9"))  # R's view of N is .9; ours is .1
    assert out is not None and out[12:16] == a("10.77.0.5") and out[16:20] == a("100.64.0.1")
    assert out == udp("10.77.0.5", "100.64.0.1")  # same bytes as if built there: checksums right


def test_spoofed_routed_sources_are_dropped_and_counted():
    """Adversary: peer S (or C, which offers nothing) sends with an inner source inside R's route,
    posing as H; and R sends from S's route. Every one is dropped and counted; an ordinary
    source from a peer is still translated to its virtual address (it cannot pose as anyone)."""
    ov = node_n()
    assert ov.inbound(ID_S, udp("10.77.0.5", "100.64.0.1")) is None
    assert ov.inbound(bytes(20), udp("10.77.0.5", "100.64.0.1")) is None
    assert ov.inbound(ID_R, udp("10.50.0.5", "100.64.0.1")) is None
    assert ov.inbound(ID_R, ipv6(ip_address("fd00:50::1").packed, v6_of(ID_N).packed)) is None
    assert ov.stats["rx_spoofed_source"] == 4
    plain = ov.inbound(ID_S, udp("192.168.1.4", "100.64.0.1"))
    assert plain is not None and plain[12:16] == ov.book.assign(ID_S).packed


def test_router_forwards_only_into_its_advertised_routes():
    """R advertises 10.77.0.0/24: N's packet to H keeps its destination (source translated to R's
    view of N, which the masquerade then hides); anything else still ends at R itself (IPv4) or is
    refused (IPv6)."""
    ov = Overlay(ID_R, V4Book(), RouteTable(parse_prefixes(LAN + ",fd00:77::/64"), local=IPv4Network("100.64.0.0/10")))
    ov.addresses(ID_N)
    v4_n = ov.book.assign(ID_N).packed
    out = ov.inbound(ID_N, udp("100.64.0.1", "10.77.0.5"))
    assert out == udp(str(ipaddress.IPv4Address(v4_n)), "10.77.0.5")
    other = ov.inbound(ID_N, udp("100.64.0.1", "10.78.0.5"))
    assert other is not None and other[16:20] == ov.my_v4
    h6 = ip_address("fd00:77::5").packed
    assert ov.inbound(ID_N, ipv6(v6_of(ID_N).packed, h6)) is not None
    assert ov.inbound(ID_N, ipv6(v6_of(ID_N).packed, ip_address("fd00:78::5").packed)) is None
    assert ov.stats["rx_wrong_destination"] == 1


# --- the daemon's adapter: forwarding rules and kernel routes (fake runner) ----------------------


class FakeIptables:
    """Stands for iptables/ip: keeps the rules added; -C fails for a rule that is not there."""

    def __init__(self, fail_on: str = "") -> None:
        self.rules: list[tuple[str, ...]] = []
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv: list[str]) -> None:
        self.calls.append(argv)
        if self.fail_on and self.fail_on in argv:
            raise ForwardingError(f"{argv[0]}: refused")
        if argv[0] == "ip":
            return
        op = next(a for a in argv if a in ("-A", "-D", "-C"))
        rule = tuple(a for a in argv if a != op)
        if op == "-A":
            self.rules.append(rule)
        elif rule not in self.rules:
            raise ForwardingError("no such rule")
        elif op == "-D":
            self.rules.remove(rule)


def fw_with(tmp_path, ipt) -> Forwarding:
    sysctl = tmp_path / "sys"
    sysctl.mkdir(exist_ok=True)
    for name in ("ip_forward", "forwarding"):
        (sysctl / name).write_text("0\n")
    return Forwarding(tmp_path, ipt, sysctl)


def test_forwarding_adds_then_removes_exactly_its_rules_and_restores_sysctls(tmp_path):
    ipt = FakeIptables()
    ipt.rules.append(("iptables", "-w", "-t", "nat", "POSTROUTING", "-j", "MASQUERADE"))  # the operator's own
    fw = fw_with(tmp_path, ipt)
    rules = forwarding_rules("ntm0", IPv4Network("100.64.0.0/10"), parse_prefixes(LAN + ",fd00:77::/64"))
    fw.apply(rules, {4, 6})
    assert len(ipt.rules) == 1 + 6 and (tmp_path / "sys" / "ip_forward").read_text() == "1\n"
    nat = [r for r in ipt.rules if "MASQUERADE" in r and "-s" in r]
    assert ("iptables", "-w", "-t", "nat", "POSTROUTING", "-s", "100.64.0.0/10", "-d", LAN) == nat[0][:9]
    fw.remove()
    assert ipt.rules == [("iptables", "-w", "-t", "nat", "POSTROUTING", "-j", "MASQUERADE")]
    assert (tmp_path / "sys" / "ip_forward").read_text() == "0\n" and not (tmp_path / STATE_FILE).exists()


def test_a_crashed_daemons_rules_are_removed_at_the_next_start(tmp_path):
    """Hostile condition: the daemon is SIGKILLed with its rules in place (and one rule was removed
    by hand meanwhile). The next start removes the rest from the state file, nothing else."""
    ipt = FakeIptables()
    fw_with(tmp_path, ipt).apply(forwarding_rules("ntm0", IPv4Network("100.64.0.0/10"), parse_prefixes(LAN)), {4})
    assert len(ipt.rules) == 3
    ipt.rules.pop(0)  # an operator removed one by hand
    fresh = fw_with(tmp_path, ipt)
    (tmp_path / "sys" / "ip_forward").write_text("1\n")  # as the crashed daemon left it
    assert fresh.recover() == 3
    assert ipt.rules == [] and (tmp_path / "sys" / "ip_forward").read_text() == "0\n"
    assert fresh.recover() == 0  # nothing left to do


def test_a_failed_rule_undoes_the_setup(tmp_path):
    ipt = FakeIptables(fail_on="ip6tables")
    fw = fw_with(tmp_path, ipt)
    with pytest.raises(ForwardingError, match="cannot set up forwarding"):
        fw.apply(forwarding_rules("ntm0", IPv4Network("100.64.0.0/10"), parse_prefixes(LAN + ",fd00:77::/64")), {4, 6})
    assert ipt.rules == [] and not (tmp_path / STATE_FILE).exists()
    assert (tmp_path / "sys" / "ip_forward").read_text() == "0\n"


async def test_route_sync_learns_verified_offers_and_installs_routes():
    """The DC answers for R with R's offer, then with a forged one, then (adversary: a DC serving
    S's genuine offer as R's) another node's: only R's own verified offer is used."""
    answers = {ID_R: offer(KEY_R, LAN, exit=True)}

    async def whois(peer: bytes) -> messages.NodeInfo:
        return messages.NodeInfo(
            node=keys.checksum(peer),
            home_dc=keys.checksum(ID_S),
            timestamp=1,
            revoked=False,
            online=True,
            routes=answers.get(peer),
        )

    table = RouteTable(local=IPv4Network("100.64.0.0/10"))
    table.choose({ID_R: None}, exit_node=ID_R)
    ip = FakeIptables()
    sync = RouteSync(table, whois, "ntm0", ip)
    await sync.fetch(ID_R)
    assert table.lookup(a("10.77.0.1")) == ID_R
    assert ["ip", "-4", "route", "replace", LAN, "dev", "ntm0"] in ip.calls
    assert ["ip", "-4", "route", "replace", "0.0.0.0/0", "dev", "ntm0", "table", str(EXIT_TABLE)] in ip.calls
    answers[ID_R] = msgspec.structs.replace(offer(KEY_R, "10.9.0.0/24", seq=SEQ + 5), routes=["10.8.0.0/24"])
    await sync.fetch(ID_R)
    answers[ID_R] = offer(KEY_S, "10.9.0.0/24", seq=SEQ + 9)
    await sync.fetch(ID_R)
    assert table.accepted[ID_R] == (*parse_prefixes(LAN), *EXIT_ROUTES)  # neither changed anything
    assert set(sync.status()["unknown"]) == {keys.checksum(ID_R)}
    answers[ID_R] = offer(KEY_R, "10.9.0.0/24", seq=SEQ + 10)  # R withdraws the LAN and its exit
    await sync.fetch(ID_R)
    assert table.lookup(a("10.9.0.1")) == ID_R and table.lookup(a("10.77.0.1")) is None
    assert ["ip", "-4", "route", "del", LAN, "dev", "ntm0"] in ip.calls
    assert ["ip", "-6", "route", "del", "::/0", "dev", "ntm0", "table", str(EXIT_TABLE)] in ip.calls
    assert sync.status()["unknown"] == {}


def test_use_routes_choice_parsing():
    names = {"r": ID_R, "s": ID_S}

    def resolve(name: str) -> bytes:
        if name not in names:
            raise ValueError(f"unknown peer {name}")
        return names[name]

    assert parse_choice(["r", "s:10.9.0.0/24,s:10.8.0.0/24"], resolve) == {
        ID_R: None,
        ID_S: frozenset(parse_prefixes("10.9.0.0/24,10.8.0.0/24")),
    }
    assert parse_choice(["r:10.9.0.0/24", "r"], resolve) == {ID_R: None}  # all of it wins
    for bad in (["x"], ["r:10.9.0.1/24"], ["r:0.0.0.0/0"]):
        with pytest.raises(RouteError):
            parse_choice(bad, resolve)


def test_the_daemons_route_options_are_checked_before_anything_starts():
    """`ntm up` with an advertised route inside its own virtual network, or routes of a peer it
    cannot name: refused with the reason; a good configuration gives a verifiable offer."""
    from node.daemon import DaemonError, UpOptions, route_table
    from node.peers import PeerBook

    book = PeerBook()
    book.set_alias("car", ID_R)
    clock = FakeClock()

    def opts(**kw) -> UpOptions:
        return UpOptions(
            tun="ntm0",
            require_tun=False,
            v4_net=IPv4Network("100.64.0.0/10"),
            path_mtu=1500,
            dns=None,
            accept_any=False,
            echo=False,
            host=None,
            port=0,
            keepalive=25.0,
            **kw,
        )

    with pytest.raises(DaemonError, match="overlaps the virtual network"):
        route_table(KEY_S, book, opts(advertise_routes=parse_prefixes("100.64.8.0/24")), clock)
    with pytest.raises(DaemonError, match="nobody"):
        route_table(KEY_S, book, opts(use_routes=["nobody"]), clock)
    table, signed = route_table(KEY_S, book, opts(advertise_routes=parse_prefixes(LAN), use_routes=["car"]), clock)
    assert verify_offer(signed).routes == tuple(parse_prefixes(LAN)) and table.peers() == {ID_R}
    assert route_table(KEY_S, book, opts(exit_node="car"), clock)[1] is None  # uses an exit, offers nothing

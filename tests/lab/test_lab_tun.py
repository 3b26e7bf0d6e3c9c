"""`ntm up` with TUN in the NAT lab (issue #10): unmodified applications (ping, a TCP transfer)
between virtual addresses and `.ntm` names, directly and through the relay; cryptokey routing;
the allow list; the DNS responder; TCP connections that survive a move to another NAT and from
IPv4-only to IPv6-only. Real anvil, DCs, relay and `ntm` processes in network namespaces.
Nodes are labkit/lab/upnode.py's: registered from their namespace, reaching their DC by name.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import labkit.lab
from labkit.lab.fed import Federation
from labkit.lab.upnode import UpNode, transfer

pytestmark = pytest.mark.lab

KEEPALIVE_S = 2.0
ROOT_LAB = Path(labkit.lab.__file__).resolve().parent  # the lab helpers run inside namespaces
TRANSFER_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def fed(lab_shared, tmp_path_factory):
    with Federation(lab_shared, tmp_path_factory.mktemp("tunfed"), n_dcs=2, keepalive_s=KEEPALIVE_S) as f:
        yield f


def test_ping_dns_tcp_direct_and_allow_list(fed):
    """A and B behind two NATs (punched path). B accepts only A. Names, ping -6, ping (IPv4),
    20 MB over TCP with TUN offloads on both ends (A reads super-packets: far fewer reads than
    segments); C (not allowed) is refused; DNS refuses what it does not serve. IPv4 addresses are
    per machine, so `ntm status --json` says where each peer sees this node, as the peer told it
    over the tunnel: B gave C an address first, so the two views differ and a swap would show."""
    lab = fed.lab
    b = UpNode(fed, lab.add_site("tb", "eim").host, 1, "--offload")
    a = UpNode(fed, lab.add_site("ta", "eim").host, 0, "--accept-any", "--offload")
    c = UpNode(fed, lab.add_site("tc", "eim").host, 0)
    b.cli("allow", a.id)
    a.cli("alias", "bob", b.id)
    try:
        assert b.resolve(f"{c.id.lower()}.ntm", "A") == ("NOERROR", ["100.64.0.2"])  # C is .2 on B: A will be .3
        assert a.ready["offload"] and b.ready["offload"]  # the lab's kernel has TUN offloads
        rcode, v6 = a.resolve("bob.ntm", "AAAA")
        assert rcode == "NOERROR" and v6 == [b.v6]
        rcode, v4 = a.resolve("bob.ntm", "A")
        assert rcode == "NOERROR" and v4 == ["100.64.0.2"]  # A's own view of B
        assert a.resolve(f"{b.id.lower()}.ntm", "AAAA") == ("NOERROR", [b.v6])
        assert a.resolve("nobody.ntm", "A")[0] == "NXDOMAIN"
        assert a.resolve("example.com", "A")[0] == "REFUSED"

        p6 = a.run("ping", "-6", "-c", "3", "-W", "5", "bob.ntm")  # the system resolver asks the daemon
        assert p6.returncode == 0, p6.stdout + p6.stderr
        p4 = a.run("ping", "-c", "3", "-W", "5", "100.64.0.2")
        assert p4.returncode == 0, p4.stdout + p4.stderr
        print("\n" + [ln for ln in p6.stdout.splitlines() if "rtt" in ln][0])

        sent, got = transfer(a, b, b.v6, b.v6, TRANSFER_BYTES)
        assert got["bytes"] == sent["bytes"] == TRANSFER_BYTES and got["sha256"] == sent["sha256"]
        [row] = a.status()["peers"]
        assert row["peer"] == b.id and row["route"] == "punched" and row["names"] == ["bob"]
        assert row["tx_bytes"] > TRANSFER_BYTES
        assert row["ipv4"] == "100.64.0.2" and row["sees_you_as"] == {"ipv6": a.v6, "ipv4": "100.64.0.3"}
        reads = a.status()["counters"]["tun_rx_packets"]
        assert reads < TRANSFER_BYTES / 1400 / 4, reads  # ~15,000 segments left in super-packets
        print(
            f"TCP 20 MB direct (punched, IPv6 inner): {got['elapsed_s']:.2f} s, "
            f"{TRANSFER_BYTES * 8 / got['elapsed_s'] / 1e6:.0f} Mbit/s"
        )

        # C is not on B's allow list: its packets never get a tunnel; B counts the refusal.
        refused = c.run("ping", "-6", "-c", "2", "-W", "2", f"{b.id}.ntm")
        assert refused.returncode != 0
        sb = b.status()
        assert sb["counters"]["refused_tunnels"] >= 1
        assert [r["peer"] for r in sb["peers"]] == [a.id]
        assert sb["peers"][0]["ipv4"] == "100.64.0.3" and sb["peers"][0]["sees_you_as"] == {
            "ipv6": b.v6,
            "ipv4": "100.64.0.2",
        }
    finally:
        for n in (a, b, c):
            n.stop()


SPOOF = """
import socket, struct, sys
src, dst = socket.inet_pton(socket.AF_INET6, sys.argv[1]), socket.inet_pton(socket.AF_INET6, sys.argv[2])
payload = struct.pack("!BBHHH", 128, 0, 0, 7, 1) + b"spoofed"
hdr = struct.pack("!IHBB", 6 << 28, len(payload), 58, 64) + src + dst
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(5):
    s.sendto(hdr + payload, (sys.argv[2], 0))
"""


def test_inner_source_spoofing_is_dropped_and_relay_tcp(fed):
    """A is behind a symmetric NAT: the tunnel to B goes through the relay. 20 MB over TCP on the
    IPv4 virtual addresses (translated at each receiver), from A with TUN offloads to B without
    (`--no-offload`: every segment A cuts must be a whole packet with its checksums complete).
    Then A's host sends raw IPv6 packets whose inner source is C's overlay address: B drops and
    counts every one."""
    lab = fed.lab
    b = UpNode(fed, lab.add_site("rb", "eim").host, 1, "--accept-any", "--no-offload")
    a = UpNode(fed, lab.add_site("ra", "symmetric").host, 0, "--offload")
    c = UpNode(fed, lab.add_site("rc", "eim").host, 0)
    try:
        a.cli("alias", "bob", b.id)
        assert a.ready["offload"] and not b.ready["offload"]
        assert a.resolve("bob.ntm", "A") == ("NOERROR", ["100.64.0.2"])
        runs = fed.relay_counter("udp_gro_runs")
        sent, got = transfer(a, b, "100.64.0.2", "100.64.0.1", TRANSFER_BYTES)
        assert got["bytes"] == sent["bytes"] == TRANSFER_BYTES and got["sha256"] == sent["sha256"]
        [row] = a.status()["peers"]
        assert row["route"] == "relay"
        assert fed.relay_counter("udp_gro_runs") > runs  # A's GSO sends crossed the relay as runs (GRO/GSO)
        print(
            f"\nTCP 20 MB through the relay (IPv4 inner, translated): {got['elapsed_s']:.2f} s, "
            f"{TRANSFER_BYTES * 8 / got['elapsed_s'] / 1e6:.0f} Mbit/s"
        )

        before = b.status()["counters"]
        r = a.run(sys.executable, "-c", SPOOF, c.v6, b.v6)
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
        after = b.status()["counters"]
        assert after["rx_spoofed_source"] - before["rx_spoofed_source"] == 5
        assert after["rx_ipv6"] == before["rx_ipv6"]  # none of them reached B's applications
    finally:
        for n in (a, b, c):
            n.stop()


def moving_transfer(fed, mover: UpNode, peer: UpNode, to_site: str, label: str) -> dict:
    """A 20 MB TCP transfer from `mover` to `peer` at a steady 4 MB/s; `mover` changes network
    ~1.5 s in. The same connection must finish intact; the longest stall is printed."""
    lab = fed.lab
    mover.cli("alias", "peer", peer.id)  # known by name: its overlay address routes to it

    def move() -> None:
        time.sleep(1.5)
        lab.move(mover.host, to_site)

    sent, got = transfer(mover, peer, peer.v6, peer.v6, TRANSFER_BYTES, rate=4e6, during=move)
    line = (
        f"{label}: TCP stall {got['max_stall_s']:.2f} s, transfer {got['elapsed_s']:.1f} s, "
        f"intact: {got['sha256'] == sent['sha256']}"
    )
    print("\n" + line)
    (fed.workdir / "handover.txt").open("a").write(line + "\n")
    assert got["bytes"] == sent["bytes"] == TRANSFER_BYTES and got["sha256"] == sent["sha256"]
    return got


def test_tcp_survives_move_to_another_nat(fed):
    lab = fed.lab
    lab.add_site("mv2", "eim")
    p = UpNode(fed, lab.add_site("mvp", "eim").host, 1, "--accept-any")
    m = UpNode(fed, lab.add_site("mv1", "eim").host, 0, "--accept-any")
    try:
        moving_transfer(fed, m, p, "mv2", "move NAT → NAT (peer behind NAT)")
        assert m.status()["peers"][0]["redirects"] >= 1 or p.status()["peers"][0]["redirects"] >= 1
    finally:
        m.stop()
        p.stop()


def test_tcp_survives_move_from_ipv4_only_to_ipv6_only(fed):
    lab = fed.lab
    lab.add_site("six", "ipv6only")
    p = UpNode(fed, lab.add_public_host("v6p"), 1, "--accept-any")
    m = UpNode(fed, lab.add_site("v4m", "eim").host, 0, "--accept-any")
    try:
        moving_transfer(fed, m, p, "six", "move IPv4-only NAT → IPv6-only")
        row = m.status()["peers"][0]
        assert row["endpoint"].startswith("[2001:db8:"), row  # now over IPv6 outside as well
    finally:
        m.stop()
        p.stop()


def test_a_relayed_tunnel_moves_to_a_direct_path_after_a_move(fed):
    """M behind a symmetric NAT reaches P through the relay. M moves behind an EIM NAT during a
    TCP transfer: the tunnel does not stay on the relay; right after the move M asks for a
    direct path, both ends move onto the punched path, and the same connection finishes intact."""
    lab = fed.lab
    lab.add_site("up2", "eim")
    p = UpNode(fed, lab.add_site("upp", "eim").host, 1, "--accept-any")
    m = UpNode(fed, lab.add_site("up1", "symmetric").host, 0, "--accept-any")
    try:
        m.cli("alias", "peer", p.id)
        assert m.run("ping", "-6", "-c", "1", "-W", "5", "peer.ntm").returncode == 0
        assert m.status()["peers"][0]["route"] == "relay"
        moving_transfer(fed, m, p, "up2", "move symmetric NAT (relay) → EIM NAT")
        deadline = time.monotonic() + 15
        while m.status()["peers"][0]["route"] != "punched" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert m.status()["peers"][0]["route"] == "punched"
        assert p.status()["peers"][0]["route"] == "punched"
    finally:
        m.stop()
        p.stop()


def test_names_through_the_resolv_conf_fallback_while_up_and_after_down(fed):
    """A real `ntm up` (TUN, no systemd-resolved in the lab) with the README's fallback as the
    namespace's /etc/resolv.conf, a previous nameserver after it. Hostile condition: the daemon
    stopping (or dying) while resolv.conf still names it must not break or stall other names."""
    from node.splitdns import LOOPBACK_DNS

    from labkit.lab.dnsfallback import UPSTREAM_ANSWER
    from labkit.lab.topology import NETNS_ETC, expect

    lab = fed.lab
    n = UpNode(fed, lab.add_site("dnsf", "eim").host, 0)
    upstream = lab.python(n.host, str(ROOT_LAB / "dnsfallback.py"), "upstream", "--listen", "127.0.0.54")
    expect(upstream, "READY")
    (NETNS_ETC / n.host.ns / "resolv.conf").write_text(
        f"nameserver {LOOPBACK_DNS[0]}\nnameserver 127.0.0.54\noptions timeout:3 attempts:1\n"
    )
    peer = "0x1a642f0e3c3af545e7acbd38b07251b3990914f1"  # any node ID has a name: no tunnel needed

    def getent(name: str) -> tuple[int, str, float]:
        t0 = time.monotonic()
        r = n.run("getent", "ahosts", name)
        return r.returncode, r.stdout, time.monotonic() - t0

    try:
        assert n.status()["dns_route"] == f"{LOOPBACK_DNS[0]} (resolv.conf fallback)"
        code, out, _ = getent(f"{peer}.ntm")
        assert code == 0 and "fd6e:746d:" in out and "100.64.0." in out, out
        code, out, took = getent("example.test")
        assert code == 0 and UPSTREAM_ANSWER in out and took < 1.5, (out, took)
    finally:
        n.stop()
    code, out, took = getent("example.test")  # the daemon is gone, resolv.conf still names it
    assert code == 0 and UPSTREAM_ANSWER in out and took < 1.5, (out, took)
    code, out, took = getent(f"{peer}.ntm")
    assert code != 0 and took < 1.5, (out, took)
    print(f"\nexample.test after ntm stopped: {took:.3f} s")

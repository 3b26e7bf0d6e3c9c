"""Subnet routes in the NAT lab (issue 24 items 1-2, PROTOCOL §10.10): a node R behind one NAT
offers 10.77.0.0/24, a LAN where a plain host H (no NTMobile, no route to the overlay) listens;
N behind another NAT accepts R's route and moves 20 MB over TCP to H while R moves to a third
NAT; X, which did not accept it, cannot reach H; X's packets posing as H are dropped and counted
at N; R's forwarding rules are gone after it stops. Exits (item 3): through an exit node, and
through the relay's exit (`ntm-rs --exit`, §10.13), which admits only the node it allows.
Real anvil, DCs, relay, `ntm up` with TUN.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from labkit.lab.fed import RS_HTTP_PORT, Federation
from labkit.lab.subnet import (
    EXIT_ROUTES,
    H_ADDR,
    LAN,
    exit_pair,
    exit_user,
    relay_exit_args,
    relay_exit_user,
    subnet_router,
    wait_for_route,
)
from labkit.lab.upnode import UpNode, transfer

pytestmark = pytest.mark.lab

KEEPALIVE_S = 2.0
TRANSFER_BYTES = 20 * 1024 * 1024
FORWARD = "/proc/sys/net/ipv4/ip_forward"

# Raw IPv4/UDP packets with a chosen source (the host's kernel routes them into its TUN).
SPOOF4 = """
import socket, struct, sys
src, dst = socket.inet_aton(sys.argv[1]), socket.inet_aton(sys.argv[2])
udp = struct.pack("!HHHH", 4000, 5001, 8 + 7, 0) + b"spoofed"
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(5):
    s.sendto(hdr + udp, (sys.argv[2], 0))
"""


@pytest.fixture(scope="module")
def fed(lab_shared, tmp_path_factory):
    with Federation(
        lab_shared,
        tmp_path_factory.mktemp("routefed"),
        n_dcs=2,
        keepalive_s=KEEPALIVE_S,
        rs_args=relay_exit_args(tmp_path_factory.mktemp("rsexit")),
    ) as f:
        yield f


def iptables_rules(node: UpNode) -> str:
    return "".join(node.run("iptables", "-w", "-t", t, "-S").stdout for t in ("filter", "nat"))


def test_subnet_router_moves_and_only_accepted_routes_reach_its_lan(fed):
    lab = fed.lab
    lab.add_site("rt2", "eim")
    r, h, n = subnet_router(fed, "rt", "--accept-any")
    x = UpNode(fed, lab.add_site("rtx", "eim").host, 0)
    nodes = (n, x, r)
    fwd_fresh = x.run("cat", FORWARD).stdout.strip()  # a host namespace as R's was before
    try:
        assert "ntm-subnet-router" in iptables_rules(r) and r.run("cat", FORWARD).stdout.strip() == "1"
        routes = wait_for_route(n, r)
        assert routes["accepted"] == {r.id: [LAN]}, routes
        ping = n.run("ping", "-c", "3", "-W", "5", H_ADDR)
        assert ping.returncode == 0, ping.stdout + ping.stderr

        # X did not accept R's route: its kernel has no route into the overlay for H.
        assert x.status()["routes"]["accepted"] == {}
        assert x.run("ping", "-c", "2", "-W", "2", H_ADDR).returncode != 0

        def move() -> None:
            time.sleep(1.5)
            lab.move(r.host, "rt2")

        sent, got = transfer(n, h, H_ADDR, "0.0.0.0", TRANSFER_BYTES, rate=4e6, during=move)
        assert got["bytes"] == sent["bytes"] == TRANSFER_BYTES and got["sha256"] == sent["sha256"]
        assert got["peer"] == "10.77.0.1"  # H saw R's LAN address only (masquerade): it needs no route back
        print(
            f"\nsubnet route, router moves NAT → NAT mid-transfer: TCP 20 MB intact, stall {got['max_stall_s']:.2f} s, "
            f"{got['elapsed_s']:.1f} s (paced at 4 MB/s)"
        )
        fast, fgot = transfer(n, h, H_ADDR, "0.0.0.0", TRANSFER_BYTES)
        assert fgot["sha256"] == fast["sha256"]
        print(f"subnet route TCP 20 MB unpaced: {TRANSFER_BYTES * 8 / fgot['elapsed_s'] / 1e6:.0f} Mbit/s")

        # Adversary: X (a peer N accepts tunnels from) sends packets whose inner source is H's,
        # in R's route: N drops and counts every one; X's own source still gets through.
        x.cli("alias", "n", n.id)
        rcode, [n_v4] = x.resolve("n.ntm", "A")
        assert x.run("ping", "-c", "1", "-W", "5", n_v4).returncode == 0
        before = n.status()["counters"]
        spoof = x.run(sys.executable, "-c", SPOOF4, H_ADDR, n_v4)
        assert spoof.returncode == 0, spoof.stderr
        time.sleep(0.5)
        after = n.status()["counters"]
        assert after["rx_spoofed_source"] - before["rx_spoofed_source"] == 5
        assert after["rx_ipv4"] == before["rx_ipv4"]

        # Hostile condition: R's daemon is SIGKILLed. Its rules stay (nothing ran to remove
        # them); the next start removes them from its state file before adding its own again.
        ours = [ln for ln in iptables_rules(r).splitlines() if "ntm-subnet-router" in ln]
        r.proc.kill()
        r.proc.wait(10)
        assert [ln for ln in iptables_rules(r).splitlines() if "ntm-subnet-router" in ln] == ours
        assert (r.home / "forwarding.json").exists()
        r.start()
        assert [ln for ln in iptables_rules(r).splitlines() if "ntm-subnet-router" in ln] == ours  # not twice
    finally:
        for node in nodes:
            node.stop()
    # Stopped cleanly: exactly its rules are gone and forwarding is as it found it.
    assert "ntm-subnet-router" not in iptables_rules(r)
    assert r.run("cat", FORWARD).stdout.strip() == fwd_fresh
    assert not (r.home / "forwarding.json").exists()


def transfer_while_moving(m: UpNode, s, nat2: str, v6only: str) -> dict:
    """20 MB over TCP from M to the plain server S, paced at 2 MB/s, while M moves to the NAT site
    `nat2` and then to the IPv6-only site `v6only`: S's result, once checked intact and M on IPv6 only."""

    def moves() -> None:
        time.sleep(2.0)
        m.lab.move(m.host, nat2)
        time.sleep(3.0)
        m.lab.move(m.host, v6only)

    sent, got = transfer(m, s, s.addr4, "0.0.0.0", TRANSFER_BYTES, rate=2e6, during=moves)
    assert got["bytes"] == sent["bytes"] == TRANSFER_BYTES and got["sha256"] == sent["sha256"]
    assert m.host.addr4 is None  # M ended on an IPv6-only network
    return got


def test_tcp_to_a_plain_server_through_an_exit_node_survives_moves(fed):
    """Issue 24 (b, c) with an exit node: M sends its traffic for the plain public server S (no
    NTMobile) through exit node E behind a NAT. M moves NAT → NAT, then to an IPv6-only network,
    in the middle of a 20 MB TCP transfer: the same connection completes intact, and S saw one
    source address, E's (M's own addresses changed twice). Y, which E does not admit, asking for
    the same exit gets a clear refusal."""
    lab = fed.lab
    lab.add_site("exm2", "eim")
    lab.add_site("exv6", "ipv6only")
    s = lab.add_public_host("exs")
    e, m = exit_pair(fed, "ex", s.addr4)
    try:
        got = transfer_while_moving(m, s, "exm2", "exv6")
        assert got["peer"] == e.host.public4  # the exit's NAT, not M's
        print(
            f"\nexit node, M moves NAT → NAT → IPv6-only mid-transfer: TCP 20 MB intact, S saw {got['peer']} "
            f"only, stall {got['max_stall_s']:.2f} s, {got['elapsed_s']:.1f} s (paced at 2 MB/s)"
        )

        y = exit_user(fed, e, lab.add_site("exy", "eim").host, s.addr4)
        try:
            refused = y.cli("ping", e.id, check=False)
            assert refused["returncode"] != 0 and "does not accept tunnels from this node" in refused["stderr"], refused
            print(f"not admitted by the exit: {refused['stderr'].strip()}")
        finally:
            y.stop()
    finally:
        m.stop()
        e.stop()


def relay_exit_status(fed) -> dict:
    """The relay's GET /v1/exit (from the server namespace: operator networks only)."""
    url = f"https://127.0.0.1:{RS_HTTP_PORT}/v1/exit"  # the control API's TLS (its pin is the DCs' business)
    code = f"import ssl, urllib.request; print(urllib.request.urlopen({url!r}, context=ssl._create_unverified_context()).read().decode())"
    r = fed.lab.exec(fed.srv, [sys.executable, "-c", code], timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_tcp_to_a_plain_server_through_the_relays_exit_survives_moves(fed):
    """Issue 24 (b, c) with the relay as exit (§10.13): M (the node the relay's --exit-allow
    names) starts `ntm up --exit-relay`: its DC books the exit, M's traffic for the plain public
    server S goes through it. M moves NAT → NAT, then to an IPv6-only network, in the middle of
    a 20 MB TCP transfer: the same connection completes intact and S saw one source address, the
    relay's. Adversaries: M sending from another overlay address (dropped and counted at the
    relay); Y, a registered node the relay does not allow, asking for the exit (a clear refusal,
    exit code 1, nothing booked or forwarded for it); the relay SIGKILLed (its next start removes
    the rules it left)."""
    lab = fed.lab
    lab.add_site("rxm2", "eim")
    lab.add_site("rxv6", "ipv6only")
    s = lab.add_public_host("rxs")
    m = relay_exit_user(fed, lab.add_site("rxm", "eim").host, s.addr4, s.addr6)
    try:
        exit_id = relay_exit_status(fed)["exit_node"]
        assert m.status()["routes"]["accepted"] == {exit_id: EXIT_ROUTES}
        nat = lab.exec(fed.srv, ["iptables", "-w", "-t", "nat", "-S"], timeout=20).stdout
        assert "ntm-relay-exit" in nat and "100.100.0.0/16" in nat  # the relay's masquerade, tagged

        # Adversary: M sends from an overlay address that is not its own (another node's).
        fake = "fd6e:746d::dead"
        assert m.run("ip", "-6", "addr", "add", f"{fake}/128", "dev", "ntm0", "nodad").returncode == 0
        before = relay_exit_status(fed)["dropped"]["spoofed_source"]
        spoofed = m.run("ping", "-6", "-c", "5", "-i", "0.2", "-W", "1", "-I", fake, s.addr6)
        assert spoofed.returncode != 0  # S never saw them: no answer
        # the 5 echo requests, and whatever else the kernel sent from that address (its ND)
        assert relay_exit_status(fed)["dropped"]["spoofed_source"] - before >= 5
        assert m.run("ping", "-c", "2", "-W", "5", s.addr4).returncode == 0  # its own source passes

        got = transfer_while_moving(m, s, "rxm2", "rxv6")
        assert got["peer"] == fed.srv.addr4  # the relay's address, never M's NATs'
        st = relay_exit_status(fed)
        print(
            f"\nrelay exit, M moves NAT → NAT → IPv6-only mid-transfer: TCP 20 MB intact, S saw {got['peer']} "
            f"only, stall {got['max_stall_s']:.2f} s, {got['elapsed_s']:.1f} s (paced at 2 MB/s); "
            f"relay exit dropped {st['dropped']}"
        )
        fast, fgot = transfer(m, s, s.addr4, "0.0.0.0", TRANSFER_BYTES)
        assert fgot["sha256"] == fast["sha256"]
        print(
            f"relay exit TCP 20 MB unpaced (M on IPv6 only): {TRANSFER_BYTES * 8 / fgot['elapsed_s'] / 1e6:.0f} Mbit/s"
        )

        # Adversary: Y, registered, not on the relay's --exit-allow list.
        y = UpNode(fed, lab.add_site("rxy", "eim").host, 1)
        y.stop()
        try:
            refused = y.cli("up", "--tun", "ntm0", "--exit-relay", check=False)
            assert refused["returncode"] == 1 and "not on its --exit-allow list" in refused["stderr"], refused
            print(f"not allowed by the relay's exit: {refused['stderr'].strip().splitlines()[-1]}")
            st = relay_exit_status(fed)
            assert st["refused"].get("not_allowed", 0) >= 1 and list(st["booked"]) == [m.id]
        finally:
            y.stop()

        # Hostile condition: the relay is SIGKILLed. Its masquerade and forward rules stay
        # (nothing ran to remove them); its next start removes them from its state file before
        # adding its own again (the module's last test: the federation stops it cleanly after).
        def exit_rules() -> list[str]:
            out = "".join(
                lab.exec(fed.srv, [cmd, "-w", "-t", t, "-S"], timeout=20).stdout
                for cmd in ("iptables", "ip6tables")
                for t in ("filter", "nat")
            )
            return [ln for ln in out.splitlines() if "ntm-relay-exit" in ln]

        ours = exit_rules()
        assert len(ours) == 6  # FORWARD in, FORWARD back, MASQUERADE; IPv4 and IPv6
        fed.rs.kill()
        assert exit_rules() == ours
        fed.rs.start()
        assert exit_rules() == ours  # not twice
    finally:
        m.stop()

"""Self-tests of the NAT lab: each site kind behaves as its name says.

Probes are labkit/lab/probe.py run inside the namespaces; every probe has bounded loops.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from .conftest import PROBE
from labkit.lab.topology import Lab, expect, lines_of

pytestmark = pytest.mark.lab

ECHO = 7000


def finish(proc, timeout=15.0):
    """Wait for a probe; return (returncode, stdout lines)."""
    lines = lines_of(proc, wait=timeout)
    return proc.returncode, lines


def start_echo(probe, host, port=ECHO):
    p = probe(host, "echo", "--port", port, "--secs", 60)
    expect(p, r"^ECHO listening", 5)
    return p


def mapped(lines):
    """MAPPED lines -> {dest: (ip, port)}."""
    out = {}
    for ln in lines:
        f = ln.split()
        if f[0] == "MAPPED":
            out[f[1]] = (f[2], int(f[3]))
    return out


def ep(ip, port):
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def test_public_to_public_both_ways(lab, probe):
    p = lab.add_site("p", "public").host
    srv = lab.server
    start_echo(probe, srv)
    start_echo(probe, p)
    for src, dst in ((p, srv), (srv, p)):
        for fam in ("addr4", "addr6"):
            rc, lines = finish(probe(src, "query", "--to", ep(getattr(dst, fam), ECHO)))
            assert rc == 0, lines
            ((ip, port),) = mapped(lines).values()
            local = int(next(ln.split()[1] for ln in lines if ln.startswith("LOCAL")))
            assert (ip, port) == (getattr(src, fam), local), lines  # no translation at all


def test_eim_nat_maps_endpoint_independently(lab, probe):
    a = lab.add_site("a", "eim")
    pub2 = lab.add_public_host("pub2")
    start_echo(probe, lab.server)
    start_echo(probe, pub2)
    rc, lines = finish(
        probe(a.host, "query", "--port", 40001, "--to", ep(lab.server.addr4, ECHO), "--to", ep(pub2.addr4, ECHO))
    )
    assert rc == 0, lines
    m = list(mapped(lines).values())
    assert len(m) == 2
    assert {ip for ip, _ in m} == {a.public4} == {"198.18.0.101"}
    assert m[0][1] == m[1][1], f"EIM NAT must keep one public port for both destinations: {m}"
    assert a.host.addr4.startswith("10.") and a.host.public4 == a.public4


def test_symmetric_nat_maps_per_destination(lab, probe):
    b = lab.add_site("b", "symmetric")
    pub2 = lab.add_public_host("pub2")
    start_echo(probe, lab.server)
    start_echo(probe, pub2)
    rc, lines = finish(
        probe(b.host, "query", "--port", 40001, "--to", ep(lab.server.addr4, ECHO), "--to", ep(pub2.addr4, ECHO))
    )
    assert rc == 0, lines
    m = list(mapped(lines).values())
    assert {ip for ip, _ in m} == {b.public4}
    assert m[0][1] != m[1][1], f"symmetric NAT must map each destination to its own port: {m}"


def test_unsolicited_inbound_is_dropped(lab, probe):
    a = lab.add_site("a", "eim")
    third = lab.add_public_host("third")
    start_echo(probe, lab.server)
    q = probe(a.host, "query", "--to", ep(lab.server.addr4, ECHO), "--listen", 2, "--requery", 0.3)
    m = expect(q, r"^MAPPED \S+ (\S+) (\d+)", 5)
    pub_ip, pub_port = m.group(1), int(m.group(2))
    assert pub_ip == a.public4
    rc = lab.exec(
        third, [sys.executable, PROBE, "send", "--to", ep(pub_ip, pub_port), "--count", "5", "--data", "INTRUDER"]
    )
    assert rc.returncode == 0, rc.stderr
    rc, lines = finish(q)
    assert rc == 0, lines
    recv = [ln for ln in lines if ln.startswith("RECV")]
    assert any(ln.split()[1] == lab.server.addr4 for ln in recv), "the contacted server must get through"
    assert not any("INTRUDER" in ln or ln.split()[1] == third.addr4 for ln in recv), recv
    # and it was the WAN firewall that dropped them
    fw = lab.exec(a.router, [lab.ipt, "-w", "-nvx", "-L", "INPUT"]).stdout
    drops = [int(ln.split()[0]) for ln in fw.splitlines() if " DROP " in f" {ln} "]
    assert drops and drops[0] >= 5, fw


def punch_pair(lab, probe, a, b, wait):
    pa = probe(a.host, "punch", "--name", "a", "--peer", "b", "--rdv", ep(lab.server.addr4, 3478), "--wait", wait)
    pb = probe(b.host, "punch", "--name", "b", "--peer", "a", "--rdv", ep(lab.server.addr4, 3478), "--wait", wait)
    return finish(pa), finish(pb)


def test_hole_punch_between_eim_nats_is_reliable(lab, probe):
    a, b = lab.add_site("a", "eim"), lab.add_site("b", "eim")
    rdv = probe(lab.server, "rendezvous", "--port", 3478, "--secs", 60)
    expect(rdv, r"^RDV listening", 5)
    results = []
    for _ in range(5):
        lab.flush_conntrack()
        (ra, la), (rb, lb) = punch_pair(lab, probe, a, b, wait=3)
        results.append((ra, rb))
        assert ra == 0 and rb == 0, (la, lb)
        # each side reached the other's NAT public address
        assert la[-1].split()[2] == b.public4 and lb[-1].split()[2] == a.public4, (la, lb)
    assert results == [(0, 0)] * 5


def test_hole_punch_eim_to_symmetric_fails(lab, probe):
    a, b = lab.add_site("a", "eim"), lab.add_site("b", "symmetric")
    rdv = probe(lab.server, "rendezvous", "--port", 3478, "--secs", 60)
    expect(rdv, r"^RDV listening", 5)
    for _ in range(2):
        lab.flush_conntrack()
        (ra, la), (rb, lb) = punch_pair(lab, probe, a, b, wait=1.5)
        assert any(ln.startswith("INTRO") for ln in la), la  # the rendezvous worked
        assert ra != 0 and rb != 0, (la, lb)


def test_ipv6only_host_and_dual_stack_relay(lab, probe):
    six = lab.add_site("six", "ipv6only").host
    a = lab.add_site("a", "eim")
    assert six.addr4 is None and six.addr6.startswith("2001:db8:")
    assert lab.exec(six, ["ip", "-4", "route"]).stdout.strip() == ""
    assert lab.exec(six, ["ip", "-4", "addr", "show", "scope", "global"]).stdout.strip() == ""
    start_echo(probe, lab.server)
    rc, lines = finish(probe(six, "query", "--to", ep(lab.server.addr6, ECHO)))
    assert rc == 0 and list(mapped(lines).values())[0][0] == six.addr6, lines
    rc, lines = finish(probe(six, "query", "--to", ep(lab.server.addr4, ECHO), "--timeout", 1))
    assert rc != 0 and any("unreachable" in ln.lower() for ln in lines), lines
    # dual-stack relay socket on [::] (IPV6_V6ONLY=0) bridges IPv6-only and NATed IPv4-only
    relay = probe(lab.server, "relay", "--port", 3479, "--secs", 60)
    expect(relay, r"^RELAY listening", 5)
    c6 = probe(six, "relay-client", "--name", "six", "--session", "s1", "--relay", ep(lab.server.addr6, 3479))
    c4 = probe(a.host, "relay-client", "--name", "a", "--session", "s1", "--relay", ep(lab.server.addr4, 3479))
    (r6, l6), (r4, l4) = finish(c6), finish(c4)
    assert r6 == 0 and r4 == 0, (l6, l4)
    members = {expect(relay, r"^MEMBER s1 (\S+)", 2).group(1) for _ in range(2)}
    assert members == {six.addr6, a.public4}


def test_move_keeps_socket_and_server_sees_new_address(lab, probe):
    a, b = lab.add_site("a", "eim"), lab.add_site("b", "eim")
    host = a.host
    start_echo(probe, lab.server)
    s = probe(host, "stream", "--to", ep(lab.server.addr4, ECHO), "--secs", 4)
    expect(s, rf"^SEEN \S+ {re.escape(a.public4)} ", 3)
    lab.move(host, b)
    assert host.site is b and host.addr4.startswith("10.2.0.") and host.public4 == b.public4
    expect(s, rf"^SEEN \S+ {re.escape(b.public4)} ", 3)
    lab.move(host, None)  # straight onto the internet
    assert host.site is None and host.addr4.startswith("198.18.0.")
    m = expect(s, rf"^SEEN \S+ {re.escape(host.addr4)} (\d+)", 3)
    local = int(next(ln.split()[1] for ln in s._lab_reader.lines if ln.startswith("LOCAL")))
    assert int(m.group(1)) == local  # same socket, no NAT any more
    assert s.poll() is None  # the process survived both moves
    rc, lines = finish(s, 10)
    assert rc == 0 and lines[-1].startswith("END"), lines


def test_shortened_udp_timeout_expires_mapping(lab, probe):
    a, b = lab.add_site("a", "eim"), lab.add_site("b", "eim")
    lab.set_udp_timeout(a, 2)  # b keeps the kernel default (30 s)
    out = lab.exec(
        a.router,
        ["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout", "net.netfilter.nf_conntrack_udp_timeout_stream"],
    ).stdout.split()
    assert out == ["2", "2"]
    start_echo(probe, lab.server)
    # server answers at once, again after 0.5 s (refreshes the entry) and after 3.5 s idle
    qa = probe(a.host, "query", "--to", ep(lab.server.addr4, ECHO), "--later", "0.5,3.5", "--listen", 4.5)
    qb = probe(b.host, "query", "--to", ep(lab.server.addr4, ECHO), "--later", "0.5,3.5", "--listen", 4.5)
    (ra, la), (rb, lb) = finish(qa), finish(qb)

    def late(lines: list[str]) -> list[int]:
        return sorted(int(ln.split()[5]) for ln in lines if ln.startswith("RECV") and " LATE " in ln)

    assert ra == 0 and rb == 0, (la, lb)
    assert late(lb) == [0, 1], lb  # default timeout: mapping still there
    assert late(la) == [0], la  # 2 s timeout: old mapping gone, dropped
    assert f"dport={ECHO}" not in lab.conntrack(a, "-p", "udp")


def test_teardown_is_complete_and_idempotent(lab_env):
    def ours(prefix):
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [ln.split()[0] for ln in listed.splitlines() if ln.startswith(prefix + "-")]

    t0 = time.monotonic()
    lab2 = Lab()
    try:
        lab2.add_site("a", "eim")
        lab2.add_site("s", "symmetric")
        lab2.add_site("p", "public")
        lab2.add_site("six", "ipv6only")
        built = time.monotonic() - t0
        assert built < 3, f"building took {built:.2f}s"
        # inet + srv + (router + host) x 2 + public host + ipv6-only host
        assert sorted(ours(lab2.prefix)) == sorted(lab2.namespaces) and len(lab2.namespaces) == 8
        proc = lab2.run(lab2.server, ["sleep", "30"])
    finally:
        lab2.teardown()
    assert proc.poll() is not None
    assert ours(lab2.prefix) == []
    lab2.teardown()  # idempotent

    # partial build: a failure half-way through add_site still tears down cleanly
    lab3 = Lab()
    try:
        real_plug = lab3._plug
        calls = []

        def flaky_plug(*args):
            calls.append(args)
            if len(calls) == 2:
                raise RuntimeError("boom")
            return real_plug(*args)

        lab3._plug = flaky_plug
        with pytest.raises(RuntimeError):
            lab3.add_site("a", "eim")
        assert ours(lab3.prefix)
    finally:
        lab3.teardown()
    assert ours(lab3.prefix) == []

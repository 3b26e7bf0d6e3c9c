"""Issue 29 in the NAT lab: who the node daemon's DNS responder answers, and what a lookup costs
it. Real anvil, DCs, relay and `ntm up` daemons with TUN in network namespaces (labkit/lab/upnode.py).
"""

from __future__ import annotations

import os
import sys

import pytest

from labkit.lab.fed import Federation
from labkit.lab.upnode import UpNode

pytestmark = pytest.mark.lab

KEEPALIVE_S = 2.0
LOOKUPS = 300  # random <id>.ntm lookups; the issue measured peers.json growing 391 B -> 99 kB for 1,500

ASK = """
import dns.exception, dns.message, dns.query, dns.rcode, os, sys
server, names, got = sys.argv[1], sys.argv[2:], []
for name in names:
    try:
        r = dns.query.udp(dns.message.make_query(name, "A"), server, timeout=1.5)
        got.append(dns.rcode.to_text(r.rcode()))
    except dns.exception.Timeout:
        got.append("timeout")
print(" ".join(got))
"""


@pytest.fixture(scope="module")
def fed(lab_shared, tmp_path_factory):
    with Federation(lab_shared, tmp_path_factory.mktemp("secfed"), n_dcs=2, keepalive_s=KEEPALIVE_S) as f:
        yield f


def ask(node_or_host, server: str, *names: str) -> list[str]:
    r = (
        node_or_host.run(sys.executable, "-c", ASK, server, *names)
        if isinstance(node_or_host, UpNode)
        else node_or_host.exec([sys.executable, "-c", ASK, server, *names], timeout=120)
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_dns_answers_only_this_nodes_applications_and_persists_nothing(fed):
    """Hostile neighbours: a LAN neighbour of A routes to A's TUN address through A and asks for
    A's alias book; peer B, whose tunnels A accepts, asks through the tunnel (A's overlay IPv6).
    Neither gets an answer (A counts both as refused). A's own applications are answered, and
    LOOKUPS random `<id>.ntm` lookups from A itself leave peers.json as it was."""
    lab = fed.lab
    site = lab.add_site("sa", "eim")
    a = UpNode(fed, site.host, 0, "--accept-any")
    b = UpNode(fed, lab.add_site("sb", "eim").host, 1)
    neighbour = lab.add_host("sn", site)
    try:
        a.cli("alias", "bob", b.id)
        b.cli("alias", "alice", a.id)

        assert ask(a, "100.64.0.1", "bob.ntm") == ["NOERROR"]  # A's own application

        lab.exec(neighbour, ["ip", "route", "add", "100.64.0.1/32", "via", site.host.addr4], check=True)
        assert ask(neighbour, "100.64.0.1", "bob.ntm", "bob.ntm") == ["timeout", "timeout"]
        from_lan = a.status()["counters"]["dns_refused"]
        assert from_lan == 2  # they arrived, and were dropped unanswered

        # B's queries ride its tunnel to A (opened by the first one): retried while it comes up
        assert set(ask(b, a.v6, *["bob.ntm"] * 4)) == {"timeout"}
        from_peer = a.status()["counters"]["dns_refused"] - from_lan
        assert from_peer >= 1
        assert a.status()["peers"][0]["peer"] == b.id  # the tunnel was up: the queries reached A

        book = a.home / "peers.json"  # holds bob's IPv4 by now: an aliased peer's is kept
        size_before = book.stat().st_size
        names = [f"0x{os.urandom(20).hex()}.ntm" for _ in range(LOOKUPS)]
        answers = ask(a, "100.64.0.1", *names)
        assert answers == ["NOERROR"] * LOOKUPS
        size_after = book.stat().st_size
        print(
            f"\nDNS: LAN neighbour refused {from_lan}/2, peer through the tunnel refused {from_peer}/4; "
            f"{LOOKUPS} random lookups from A answered, peers.json {size_before} B -> {size_after} B"
        )
        assert size_after == size_before
    finally:
        for n in (a, b):
            n.stop()

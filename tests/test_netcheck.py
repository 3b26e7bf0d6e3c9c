"""`ntm netcheck`'s report (node/netcheck.py) from measured values: the pure part. The lab test
(tests/lab/test_lab_udp_blocked.py) runs it for real in a network without UDP and with UDP back."""

from __future__ import annotations

import json

from node.netcheck import Probe, nat_kind, report, text

LOCAL = ["10.2.0.2:4330"]
PEER = {
    "peer": "0x" + "ab" * 20,
    "names": ["bob"],
    "route": "relay",
    "transport": "tcp",
    "reason": "A has no UDP (no keepalive reached its DC): relay over TCP",
}


def test_nat_kinds_as_the_dc_ports_see_them():
    assert nat_kind(False, LOCAL, None, None) == "unknown"
    assert nat_kind(None, LOCAL, None, None) == "unknown"
    assert nat_kind(True, LOCAL, "198.18.0.5:4330", "198.18.0.5:4330") == "eim"
    assert nat_kind(True, LOCAL, "198.18.0.5:4330", "198.18.0.5:5000") == "symmetric"
    assert nat_kind(True, ["198.18.0.5:4330"], "198.18.0.5:4330", "198.18.0.5:4330") == "none"


def test_blocked_network_report_says_why_and_what_works():
    r = report(
        False,
        LOCAL,
        None,
        None,
        [Probe("http://dc1:80", True, 2.5), Probe("http://dc2:8332", False, None, "no answer within 3 s")],
        [Probe("ws://198.18.0.10:443/v1/stream", True, 6.1)],
        [PEER],
    )
    assert json.loads(json.dumps(r)) == r  # JSON as it is
    assert (r["udp"], r["nat"], r["ipv4"], r["ipv6"], r["tcp_relay_ok"]) == (False, "unknown", True, False, True)
    out = text(r)
    assert "UDP       no (blocked" in out and "unreachable: no answer within 3 s" in out
    assert "bob  relay over tcp: A has no UDP" in out and "6.1 ms" in out


def test_no_relay_stream_known_and_ipv6():
    r = report(True, ["[2001:db8::5]:4330"], "[2001:db8::5]:4330", None, [], [], [])
    assert r["ipv6"] and not r["ipv4"] and r["nat"] == "none" and not r["tcp_relay_ok"]
    assert "relay TCP none known" in text(r)


def test_peers_show_their_probed_path_mtu():
    """Each tunnel's path MTU as probed (§7 "Path MTU") and what it leaves inside; none before probing."""
    row = {**PEER, "route": "punched", "transport": "udp", "reason": None, "path_mtu": 1400, "inner_mtu": 1339}
    r = report(True, LOCAL, "198.18.0.5:4330", None, [], [], [row, PEER])
    assert r["peers"][0]["path_mtu"] == 1400 and r["peers"][1]["path_mtu"] is None
    out = text(r)
    assert "bob  punched over udp, path MTU 1400 (inner 1339)" in out
    assert "bob  relay over tcp: A has no UDP" in out

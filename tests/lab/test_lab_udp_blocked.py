"""`ntm up` in a network that lets out only DNS and TCP 80/443 (issue #22 a, PROTOCOL §8.4): real
NATs, DCs, relay and daemons with TUN. The adversary is the network's firewall: every UDP flow
out of A's LAN is dropped, so nothing but web traffic leaves.
"""

from __future__ import annotations

import pytest

from labkit.lab.fed import Federation
from labkit.lab.roam_udp import udp_blocked

pytestmark = pytest.mark.lab

TRANSFER_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def fed(lab_shared, tmp_path_factory):
    with Federation(lab_shared, tmp_path_factory.mktemp("udpblocked"), n_dcs=2, keepalive_s=2.0) as f:
        yield f


def test_no_udp_network_relays_over_tcp_then_moves_to_udp(fed):
    """A comes up, registers at its DC on port 80, is reached through the relay's TCP port 443
    and carries 20 MB to B (sha256 equal); then UDP is let out during a second transfer and the
    tunnel moves to a punched UDP path under the same TCP connection."""
    r = udp_blocked(fed, TRANSFER_BYTES)
    check_netcheck(r, fed)
    row = r["blocked_row"]
    print(
        f"\nUDP blocked: up in {r['ready_s']:.2f} s, first ping answered at {r['setup_s']:.2f} s; 20 MB over the relay's TCP stream "
        f"in {r['tcp']['elapsed_s']:.2f} s ({r['tcp']['mbps']:.0f} Mbit/s); UDP back: tunnel on UDP "
        f"{r['moved_after_s']} s later, TCP stall {r['move']['stall_s']:.2f} s"
    )
    assert r["pinged"] and r["udp"] is False
    assert row["route"] == "relay" and row["transport"] == "tcp" and "no UDP" in row["reason"], row
    assert r["tcp"]["intact"]
    assert r["udp_row"] and r["udp_row"]["route"] == "punched", r["udp_row"]
    assert r["move"]["intact"]


def check_netcheck(r: dict, fed) -> None:
    """`ntm netcheck --json` of A, blocked and then free: UDP, NAT kind, DCs, the relay's TCP."""
    blocked, free = r["netcheck_blocked"], r["netcheck_udp"]
    print("netcheck (blocked):", blocked, "\nnetcheck (UDP back):", free)
    assert blocked["udp"] is False and blocked["nat"] == "unknown" and blocked["ipv4"] is True
    assert blocked["tcp_relay_ok"] and blocked["relay_tcp"][0]["target"].endswith(":443/v1/stream")
    by_url = {p["target"]: p for p in blocked["dcs"]}
    assert by_url[f"{fed.scheme(0)}://dc1.lab:80"]["ok"]  # the DC on the web port answers
    assert not by_url[fed.dc_url(1)]["ok"]  # DC2 on its own port: the firewall drops it
    assert [p["transport"] for p in blocked["peers"]] == ["tcp"] and "no UDP" in blocked["peers"][0]["reason"]
    assert free["udp"] is True and free["nat"] == "eim" and free["observed"]
    assert [(p["route"], p["transport"]) for p in free["peers"]] == [("punched", "udp")]

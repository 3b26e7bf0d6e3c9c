"""Scenario: a node in a network that lets out only DNS and TCP 80/443 (PROTOCOL §8.4), used by
tests/lab/test_lab_udp_blocked.py and bench/roam.py.

A sits behind an EIM NAT whose router drops every new flow but DNS and web traffic; its DC is
published on port 80 (a redirect in the server namespace, as a reverse proxy would). B sits behind
another EIM NAT. A comes up, is relayed over a WebSocket to the relay's port 443, carries a TCP
transfer to B; then UDP is let out again during a second transfer and the tunnel moves to a
punched UDP path under the same TCP connection.
"""

from __future__ import annotations

import time

from .fed import Federation
from .upnode import UpNode, transfer

WEB_PORT = 80  # the DC, as published to networks that allow only web traffic
PACED_RATE = 4e6  # bytes/s of the transfer during which UDP comes back (a steady stream to stall)
UNBLOCK_AFTER_S = 1.5  # into that transfer
MOVE_TIMEOUT_S = 20.0  # for the tunnel to leave the relay once UDP works (keepalive 2 s + direction)


def wait_for(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def peer_row(node: UpNode) -> dict | None:
    peers = node.status()["peers"]
    return peers[0] if peers else None


def udp_blocked(fed: Federation, nbytes: int, tag: str = "u") -> dict:
    """Run the scenario; returns what it measured (the caller asserts). Stops its nodes."""
    lab = fed.lab
    lab.redirect_port(lab.server, WEB_PORT, fed.dc_port(0))
    b = UpNode(fed, lab.add_site(f"{tag}b", "eim").host, 1, "--accept-any")
    site = lab.add_site(f"{tag}a", "eim")
    lab.restrict_egress(site, True)
    a = None
    try:
        a = UpNode(fed, site.host, 0, "--accept-any", dc_port=WEB_PORT)
        ready_s = time.monotonic() - a.started
        a.cli("alias", "peer", b.id)
        pinged = wait_for(lambda: a.run("ping", "-6", "-c", "1", "-W", "2", "peer.ntm").returncode == 0, 30, 0)
        out = {
            "setup_s": time.monotonic() - a.started,
            "ready_s": ready_s,
            "pinged": pinged,
            "udp": a.status().get("udp"),
        }
        out["blocked_row"] = peer_row(a)
        out["netcheck_blocked"] = a.cli("netcheck")
        sent, got = transfer(a, b, b.v6, b.v6, nbytes)
        out["tcp"] = {
            "intact": got["sha256"] == sent["sha256"] and got["bytes"] == nbytes,
            "elapsed_s": got["elapsed_s"],
            "mbps": nbytes * 8 / got["elapsed_s"] / 1e6,
        }

        def unblock() -> None:
            time.sleep(UNBLOCK_AFTER_S)
            lab.restrict_egress(site, False)
            t0 = time.monotonic()
            row = wait_for(
                lambda: (r := peer_row(a)) and r["transport"] == "udp" and r["route"] != "relay" and r, MOVE_TIMEOUT_S
            )
            out["moved_after_s"] = time.monotonic() - t0 if row else None
            out["udp_row"] = row

        sent, got = transfer(a, b, b.v6, b.v6, nbytes, rate=PACED_RATE, during=unblock)
        out["move"] = {
            "intact": got["sha256"] == sent["sha256"] and got["bytes"] == nbytes,
            "stall_s": got["max_stall_s"],
        }
        out["netcheck_udp"] = a.cli("netcheck")
        return out
    finally:
        for n in (a, b):
            if n is not None:
                n.stop()

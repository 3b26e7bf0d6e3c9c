"""Make-before-break with two uplinks (issue 22 item 4): set up and measure, for
tests/lab/test_lab_mbb.py and bench/roam.py.

The mover M has two uplinks, each behind its own EIM NAT with the home-router firewall (eth0 on
site `<tag>1`, eth1 on site `<tag>2`, eth1's default route has a higher metric); the peer P is
behind a third EIM NAT. Both run `ntm up` with TUN (labkit/lab/upnode.py). A UDP sequence stream
(labkit/lab/udpseq.py) runs at `rate` packets/s each way between their overlay addresses; `before_s`
into it M's eth0 goes down (`ip link set eth0 down`: the kernel drops its routes at once and eth1's
default route takes over). The numbers are the packets lost each way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from node.state import TUNNEL_PORT

from .fed import Federation
from .topology import expect
from .upnode import UpNode

UDPSEQ = Path(__file__).with_name("udpseq.py")
STREAM_PORT = 5002
# How long M's standby path may take to be ready after the tunnel is up: one standby round
# (node/uplinks.py) at the federation's keepalive interval, with room for a loaded machine.
STANDBY_READY_S = 20.0


def standby_ready(node: UpNode, timeout: float = STANDBY_READY_S) -> float:
    """Wait until `node`'s (only) tunnel has a verified standby path on another uplink; returns
    the seconds waited (inf if it never did: the switch will then show the old behaviour)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        peers = node.status()["peers"]
        if peers and peers[0].get("standby", {}).get("ready"):
            return time.monotonic() - t0
        time.sleep(0.2)
    return float("inf")


def stream_both_ways(a: UpNode, b: UpNode, rate: float, seconds: float, during) -> tuple[dict, dict]:
    """The UDP sequence stream a→b and b→a at once over the overlay; `during()` runs meanwhile."""
    lab = a.lab
    procs = []
    for me, peer in ((a, b), (b, a)):
        p = lab.run(
            me.host,
            [
                sys.executable,
                str(UDPSEQ),
                "--bind",
                me.v6,
                "--to",
                peer.v6,
                "--port",
                str(STREAM_PORT),
                "--rate",
                str(rate),
                "--seconds",
                str(seconds),
            ],
            stdin=subprocess.PIPE,
        )
        expect(p, '"ready"')
        procs.append(p)
    for p in procs:  # both bound: go
        p.stdin.write("go\n")
        p.stdin.flush()
    during()
    out = [json.loads(expect(p, r'"sent"', timeout=seconds + 30).string) for p in procs]
    return out[0], out[1]


def make_before_break(
    fed: Federation, tag: str = "mbb", rate: float = 100.0, before_s: float = 3.0, after_s: float = 3.0
) -> dict:
    """Build the scenario in `fed`'s lab (site names start with `tag`), switch M's uplink under the
    stream, and return the measured numbers: `lost_m_to_p`, `lost_p_to_m`, the larger of the two as
    `make_before_break_lost_packets`, the stream reports, how long the standby took to be ready, and
    where P sees M afterwards (`p_sees_m`: M's second NAT, `second_nat`, if M really switched)."""
    lab = fed.lab
    m_host = lab.add_site(f"{tag}1", "eim").host
    lab.add_site(f"{tag}2", "eim")
    lab.add_uplink(m_host, f"{tag}2")
    p = UpNode(fed, lab.add_site(f"{tag}p", "eim").host, 1, "--accept-any")
    m = UpNode(fed, m_host, 0, "--accept-any")
    try:
        m.cli("alias", "peer", p.id)
        r = m.run("ping", "-6", "-c", "2", "-W", "5", "peer.ntm")
        assert r.returncode == 0, r.stdout + r.stderr
        ready_s = standby_ready(m)
        m_rep, p_rep = stream_both_ways(
            m, p, rate, before_s + after_s, lambda: (time.sleep(before_s), lab.set_link(m_host, "eth0", False))
        )
        row = m.status()["peers"][0]
        p_sees_m = p.status()["peers"][0]["endpoint"]
        lost_m_to_p = m_rep["sent"] - p_rep["received"]
        lost_p_to_m = p_rep["sent"] - m_rep["received"]
        return {
            "make_before_break_lost_packets": max(lost_m_to_p, lost_p_to_m),
            "lost_m_to_p": lost_m_to_p,
            "lost_p_to_m": lost_p_to_m,
            "rate_pps": rate,
            "standby_ready_s": round(ready_s, 2),
            "m_stream": m_rep,
            "p_stream": p_rep,
            "route_after": row["route"],
            "p_sees_m": p_sees_m,
            "second_nat": f"{lab.sites[f'{tag}2'].public4}:{TUNNEL_PORT}",
        }
    finally:
        m.stop()
        p.stop()

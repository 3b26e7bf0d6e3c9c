"""Tunnel setup under random loss (issue 22 item 5): scenario functions that the lab test
(tests/lab/test_lab_loss.py) and bench/roam.py both call; they return the measured numbers.

Loss is iptables' `statistic` match in a NAT router's mangle FORWARD chain, UDP only (the DC
session runs over TCP and stays clean), both directions of the WAN link. It sits in mangle so the
home-router firewall in filter FORWARD (topology.set_firewall) is left as it is.

    la, lb, pairs = loss_sites(fed)            # two EIM NAT sites, nine (A, B) node pairs
    res = loss_run(fed, [la], pairs, 0.05)     # {"n", "direct", "setup_ms", "p50_s", "p90_s", "rows", ...}
    late = late_direct(fed, *pairs[0], la, 3.0)  # direct path blocked for 3 s: relay, then direct
    bench_numbers(fed)                         # the two numbers bench/roam.py prints
"""

from __future__ import annotations

import time

from .fed import NodeProc, ip_of
from .topology import Lab

#: After a setup that ended on the relay (either side), wait this long before looking again: a
#: direct handshake that completes later moves the tunnel (ntm/tunnel.py DIRECT_UPGRADE_FOR), and
#: "ended direct" is where the tunnel is once setup has settled.
SETTLE_S = 3.0
#: Longest wait for the peer's "accepted" event: the tunnel timeout (node/tunnels.py) plus room.
ACCEPT_TIMEOUT_S = 12.0


#: Hosts per NAT site: 3 × 3 (A, B) pairs keep each peer within its per-peer direction rate
#: (a burst of 8, node/tunnels.py PEER_DIRECTIONS) over two runs of 20 setups.
HOSTS_PER_SITE = 3


def loss_sites(fed, prefix: str = "l") -> tuple:
    """Two EIM NAT sites (home-router firewall: they punch reliably) with HOSTS_PER_SITE node
    hosts each, A side at DC1 and B side at DC2; returns (site A, site B, every (A, B) pair)."""
    lab = fed.lab
    sites = [lab.add_site(f"{prefix}{s}", "eim", host=f"{prefix}{s}1") for s in "ab"]
    nodes = []
    for dc, site in enumerate(sites):
        hosts = [site.host] + [lab.add_host(f"{site.name}{i}", site) for i in range(2, HOSTS_PER_SITE + 1)]
        nodes.append([fed.node(h, dc=dc % len(fed.dcs)) for h in hosts])
    return sites[0], sites[1], [(x, y) for x in nodes[0] for y in nodes[1]]


def _mangle(lab: Lab, site, *args: str) -> str:
    """iptables on `site`'s NAT router, mangle table (the loss rules live there, nothing else)."""
    return lab.exec(site.router, [lab.ipt, "-w", "-t", "mangle", *args], check=True).stdout


def add_loss(lab: Lab, site, probability: float) -> None:
    """Drop each UDP datagram crossing `site`'s NAT uplink (either way) with `probability`."""
    match = ["-p", "udp", "-m", "statistic", "--mode", "random", "--probability", f"{probability:.4f}", "-j", "DROP"]
    for way in ("-i", "-o"):
        _mangle(lab, site, "-A", "FORWARD", way, "wan", *match)


def block_udp_to(lab: Lab, site, ip: str) -> None:
    """Drop all UDP between `site`'s NAT uplink and `ip` (a direct path that does not work yet)."""
    for rule in (["-o", "wan", "-d", ip], ["-i", "wan", "-s", ip]):
        _mangle(lab, site, "-A", "FORWARD", *rule, "-p", "udp", "-j", "DROP")


def clear_loss(lab: Lab, site) -> None:
    """Remove every loss or block rule from `site`'s NAT router."""
    _mangle(lab, site, "-F", "FORWARD")


def dropped(lab: Lab, site) -> int:
    """Datagrams the loss rules of `site` dropped so far (to check the loss was really there)."""
    out = _mangle(lab, site, "-nvx", "-L", "FORWARD")
    return sum(int(ln.split()[0]) for ln in out.splitlines() if " DROP " in f" {ln} ")


def _direct(answer: dict, peer: NodeProc, relay_ips: set[str]) -> bool:
    """The tunnel sends to the peer's own (public) address, not to the relay."""
    addr = answer.get("peer_addr")
    return (
        answer.get("via") != "relay"
        and addr is not None
        and ip_of(addr) not in relay_ips
        and ip_of(addr) in {peer.host.public4, peer.host.public6} - {None}
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty list."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def setup_under_loss(fed, pairs: list[tuple[NodeProc, NodeProc]], n: int = 20) -> dict:
    """`n` fresh tunnels, taking the (A, B) pairs in turn (several pairs keep each peer within
    its direction rate, node/tunnels.py PEER_DIRECTIONS). A connects to B; the setup time is
    A's connect() (direction + handshake). A tunnel counts as direct when, once settled, both
    ends send to the other's public address. Each tunnel is closed before the next opens."""
    rows = []
    for i in range(n):
        a, b = pairs[i % len(pairs)]
        ta = a.call("connect", peer=b.id, timeout=ACCEPT_TIMEOUT_S + 5)
        tb = b.next_event("accepted", ACCEPT_TIMEOUT_S, tunnel=ta["tunnel"])
        first = _direct(ta, b, fed.relay_ips) and _direct(tb, a, fed.relay_ips)
        ia, ib = ta, tb
        if not first:
            time.sleep(SETTLE_S)
            ia, ib = a.call("info", tunnel=ta["tunnel"]), b.call("info", tunnel=ta["tunnel"])
        direct = _direct(ia, b, fed.relay_ips) and _direct(ib, a, fed.relay_ips)
        rows.append(
            {
                "setup_ms": ta["setup_ms"],
                "via": ta["via"],
                "b_via": tb["via"],
                "first_direct": first,
                "direct": direct,
                "peer_addr": ia["peer_addr"],
                "b_peer_addr": ib["peer_addr"],
            }
        )
        a.call("close", tunnel=ta["tunnel"])
        b.call("close", tunnel=ta["tunnel"])
    setups = [r["setup_ms"] / 1000 for r in rows]
    return {
        "n": n,
        "direct": sum(r["direct"] for r in rows),
        "first_direct": sum(r["first_direct"] for r in rows),
        "setup_ms": [r["setup_ms"] for r in rows],
        "p50_s": percentile(setups, 0.5),
        "p90_s": percentile(setups, 0.9),
        "rows": rows,
    }


def loss_run(fed, lossy: list, pairs: list[tuple[NodeProc, NodeProc]], probability: float, n: int = 20) -> dict:
    """setup_under_loss with `probability` loss on every site in `lossy`, removed afterwards;
    the result also carries how many datagrams the rules dropped."""
    lab = fed.lab
    for site in lossy:
        add_loss(lab, site, probability)
    try:
        res = setup_under_loss(fed, pairs, n)
        res["dropped"] = sum(dropped(lab, site) for site in lossy)
    finally:
        for site in lossy:
            clear_loss(lab, site)
    res["loss"] = probability
    return res


#: How often late_direct looks at both ends while waiting for the tunnel to leave the relay.
POLL_S = 0.02
#: Longest wait for the move: well past the 0.25 s between direct attempts, inside their window.
MOVE_TIMEOUT_S = 5.0


def late_direct(fed, a: NodeProc, b: NodeProc, site, block_s: float) -> dict:
    """A connects to B while UDP between A's NAT and B's public address is dropped, so the
    tunnel comes up on the relay; after `block_s` the direct path works. Returns where each end
    was at setup and how long after the unblock both ends sent to each other directly
    (`moved_s`, None if not within MOVE_TIMEOUT_S)."""
    lab = fed.lab
    block_udp_to(lab, site, b.host.public4)
    try:
        t0 = time.monotonic()
        ta = a.call("connect", peer=b.id, timeout=ACCEPT_TIMEOUT_S + 5)
        tb = b.next_event("accepted", ACCEPT_TIMEOUT_S, tunnel=ta["tunnel"])
        time.sleep(max(0.0, block_s - (time.monotonic() - t0)))
    finally:
        clear_loss(lab, site)
    unblocked, moved = time.monotonic(), None
    while moved is None and time.monotonic() - unblocked < MOVE_TIMEOUT_S:
        ia, ib = a.call("info", tunnel=ta["tunnel"]), b.call("info", tunnel=ta["tunnel"])
        if _direct(ia, b, fed.relay_ips) and _direct(ib, a, fed.relay_ips):
            moved = time.monotonic() - unblocked
        else:
            time.sleep(POLL_S)
    a.call("close", tunnel=ta["tunnel"])
    b.call("close", tunnel=ta["tunnel"])
    return {
        "setup_ms": ta["setup_ms"],
        "via_at_setup": ta["via"],
        "b_via_at_setup": tb["via"],
        "moved_s": moved,
        "via": ia["via"],
        "b_via": ib["via"],
    }


def bench_numbers(fed, n: int = 20) -> dict:
    """What bench/roam.py prints: the share of `n` fresh setups that ended direct at 5% loss on
    one NAT's uplink, and the p90 setup time at 20%."""
    la, _, pairs = loss_sites(fed, prefix="bl")
    five, twenty = loss_run(fed, [la], pairs, 0.05, n), loss_run(fed, [la], pairs, 0.20, n)
    return {
        "setup_direct_share_loss5": five["direct"] / five["n"],
        "setup_p90_s_loss20": twenty["p90_s"],
        "runs": [five, twenty],
    }


def summary(res: dict) -> str:
    """One line for the test output and the bench."""
    return (
        f"loss {res['loss']:.0%}: {res['direct']}/{res['n']} direct ({res['first_direct']} direct at once), "
        f"setup p50 {res['p50_s'] * 1000:.0f} ms p90 {res['p90_s'] * 1000:.0f} ms, "
        f"{res['dropped']} datagrams dropped; setups ms {sorted(res['setup_ms'])}"
    )

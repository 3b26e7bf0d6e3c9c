"""Dead paths and NAT rebinding in the NAT lab, as functions that set up, measure and return the
numbers (tests/lab/test_lab_deadpath.py asserts on them; bench/roam.py prints them).

  * dc_link_loss_failover(): the home DC's link goes silent (iptables DROP, no RST) under a
    running TCP transfer; how long until the node is at another DC, and until a third node's new
    tunnel to it carries a ping.
  * nat_rebind_unreachable(): a NAT's public address changes (UDP only: the TCP session to the DC
    survives) while the tunnel is idle; how long the peer's pings take to get through again.
  * direct_path_loss_outage(): the direct path between two NATs stops carrying UDP under a ping
    stream; the longest gap in replies until the tunnel runs through the relay.
  * idle_move_tells_peer(): a node moves to another NAT while its tunnel to a public peer is
    idle; how soon it notices (rtnetlink) and whether the peer already follows it, unasked.

Nodes are real `ntm up` daemons with TUN (labkit/lab/upnode.py) behind real NATs.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

from .fed import Federation
from .topology import Host, Site
from .upnode import UpNode, transfer

# The transfer running while the DC's link is cut: paced so it outlasts the failover (~8 s).
CUT_TRANSFER_BYTES = 16 * 1024 * 1024
CUT_TRANSFER_RATE = 1e6  # bytes/s
# How long to wait for the failover and for the third node's ping before giving up.
FAILOVER_WAIT_S = 30.0
# Pings the peer sends after the rebind: one per PING_INTERVAL_S for REBIND_PING_S.
PING_INTERVAL_S = 0.02
REBIND_PING_S = 4.0
# The ping stream across a direct path that dies: cut CUT_AFTER_S into PATH_LOSS_PING_S.
PATH_LOSS_PING_S = 8.0
CUT_AFTER_S = 1.5
# Idle time before the rebind: past liveness.ACTIVE_WINDOW_S, so the tunnel counts as idle.
IDLE_BEFORE_REBIND_S = 2.0
# The NAT's second public address (UDP is moved to it): 198.18.0.(REBIND_BASE + router index).
REBIND_BASE = 200

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
PING_REPLY = re.compile(r"^\[(\d+\.\d+)\] .*icmp_seq=(\d+)")


def _log_time(line: str) -> float | None:
    """Wall time of a log line written with daemon/service.LOG_FORMAT (local time, ms)."""
    m = LOG_TIME.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def wait_log(path: Path, needle: str, since: float, timeout: float) -> float:
    """Wall time of the first line of `path` containing `needle`, logged at or after `since`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in path.read_text(errors="replace").splitlines():
            t = _log_time(line)
            if needle in line and t is not None and t >= since - 0.001:
                return t
        time.sleep(0.1)
    raise TimeoutError(f"no {needle!r} in {path} within {timeout} s")


def udp_ports_of(fed: Federation, pid: int) -> list[int]:
    """UDP ports a process in the server namespace listens on (a DC's keepalive ports)."""
    out = fed.lab.exec(fed.srv, ["ss", "-Hlunp"], timeout=10).stdout
    ports = []
    for line in out.splitlines():
        if f"pid={pid}," in line:
            ports.append(int(line.split()[3].rsplit(":", 1)[1]))
    return ports


def cut_dc_link(fed: Federation, i: int) -> list[list[str]]:
    """Drop every packet to and from DC i (HTTP port and keepalive ports) in the server namespace:
    a pulled cable, no RST. Returns the rules (for restore_dc_link)."""
    rules = []
    for proto, port in [("tcp", fed.dc_port(i)), *(("udp", p) for p in udp_ports_of(fed, fed.dcs[i].pid))]:
        rules += [
            ["INPUT", "-p", proto, "--dport", str(port), "-j", "DROP"],
            ["OUTPUT", "-p", proto, "--sport", str(port), "-j", "DROP"],
        ]
    for cmd in ("iptables", "ip6tables"):
        for r in rules:
            fed.lab.exec(fed.srv, [cmd, "-I", *r], check=True)
    return rules


def restore_dc_link(fed: Federation, rules: list[list[str]]) -> None:
    for cmd in ("iptables", "ip6tables"):
        for r in rules:
            fed.lab.exec(fed.srv, [cmd, "-D", *r])


def ping_until_reply(node: UpNode, to: str, timeout: float) -> float:
    """Ping `to` from `node` (one ping per second, each waiting 1 s) until one is answered; the
    wall time of that answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = node.run("ping", "-6", "-n", "-c", "1", "-W", "1", to, timeout=10)
        if r.returncode == 0:
            return time.time()
    raise TimeoutError(f"{to} did not answer {node.host.name}'s pings within {timeout} s")


def ping_stream(node: UpNode, to: str, seconds: float, during=None) -> tuple[float, list[tuple[float, int]]]:
    """`node` pings `to` every PING_INTERVAL_S for `seconds` (each reply awaited up to 1 s) while
    `during()` runs; returns (wall time the stream started, [(reply wall time, icmp_seq)])."""
    count = int(seconds / PING_INTERVAL_S)
    t0 = time.time()
    proc = node.lab.run(
        node.host, ["ping", "-6", "-n", "-D", "-i", str(PING_INTERVAL_S), "-c", str(count), "-W", "1", to]
    )
    if during is not None:
        during()
    out, _ = proc.communicate(timeout=seconds + 15)
    return t0, [(float(m.group(1)), int(m.group(2))) for m in map(PING_REPLY.match, out.splitlines()) if m]


def dc_link_loss_failover(
    fed: Federation, x_host: Host, y_host: Host, z_host: Host, nbytes: int = CUT_TRANSFER_BYTES
) -> dict:
    """X (home DC 0) sends a paced TCP transfer of `nbytes` to Y (home DC 1); DC 0's link is cut. Measures
    `failover_s` (cut → X's log says it failed over), `new_tunnel_s` (cut → the first ping of a
    third node Z (home DC 1), sent once X failed over, answered through a new tunnel), and checks
    the transfer finished intact (`intact`, `max_stall_s`)."""
    y = UpNode(fed, y_host, 1, "--accept-any")
    x = UpNode(fed, x_host, 0, "--accept-any")
    z = UpNode(fed, z_host, 1)
    rules: list[list[str]] = []
    out: dict = {}
    try:
        x.cli("alias", "y", y.id)  # known peers' overlay addresses route to them
        z.cli("alias", "x", x.id)
        # the tunnel X → Y first, so the transfer does not race the cut
        assert x.run("ping", "-6", "-c", "1", "-W", "5", y.v6).returncode == 0

        def cut_and_measure() -> None:
            time.sleep(1.0)
            t_cut = time.time()
            rules.extend(cut_dc_link(fed, 0))
            t_over = wait_log(Path(x.log.name), "failed over from", t_cut, FAILOVER_WAIT_S)
            t_reply = ping_until_reply(z, x.v6, FAILOVER_WAIT_S)
            out.update(failover_s=round(t_over - t_cut, 2), new_tunnel_s=round(t_reply - t_cut, 2))

        sent, got = transfer(x, y, y.v6, y.v6, nbytes, rate=CUT_TRANSFER_RATE, during=cut_and_measure)
        st = x.status()
        out.update(
            intact=got["sha256"] == sent["sha256"] and got["bytes"] == nbytes,
            max_stall_s=got["max_stall_s"],
            x_dc=st["dc"],
            failovers=st["failovers"],
            dc_silences=st["dc_silences"],
        )
        return out
    finally:
        restore_dc_link(fed, rules)
        for n in (x, y, z):
            n.stop()


def rebind_nat(fed: Federation, site: Site) -> str:
    """The NAT of `site` moves its UDP mappings to a second public address: new UDP flows leave
    from it and the existing UDP mappings are forgotten (conntrack), as a CGNAT that rebinds.
    TCP keeps the old address and its connections. Returns the new public address."""
    r = site.router
    new = f"198.18.0.{REBIND_BASE + int(r.lan_net.network_address.packed[1])}"
    lab = fed.lab
    lab.exec(r.ns, ["ip", "addr", "add", f"{new}/24", "dev", "wan"], check=True)
    lab.exec(
        r.ns,
        ["iptables", "-t", "nat", "-I", "POSTROUTING", "1", "-o", "wan", "-p", "udp", "-j", "SNAT", "--to-source", new],
        check=True,
    )
    lab.exec(r.ns, ["conntrack", "-D", "-p", "udp"])
    return new


def nat_rebind_unreachable(fed: Federation, node_site: Site, peer_site: Site) -> dict:
    """N (behind `node_site`) and P (behind `peer_site`) have a direct tunnel, idle; N's NAT
    rebinds (new public address for UDP). P then pings N every 20 ms: `unreachable_s` is the
    time from P's first ping to the first reply (the peer's traffic reaching N again and back);
    also the route of the tunnel afterwards and how many repairs each end made."""
    p = UpNode(fed, peer_site.host, 1, "--accept-any")
    n = UpNode(fed, node_site.host, 0, "--accept-any")
    try:
        p.cli("alias", "n", n.id)
        assert p.run("ping", "-6", "-c", "1", "-W", "5", n.v6).returncode == 0
        before = p.status()["peers"][0]
        time.sleep(IDLE_BEFORE_REBIND_S)
        new_ip = rebind_nat(fed, node_site)
        t0, replies = ping_stream(p, n.v6, REBIND_PING_S)
        if not replies:
            raise AssertionError("no ping reply after the rebind")
        time.sleep(0.5)  # let both ends settle before reading their status
        after_p, after_n = p.status()["peers"][0], n.status()["peers"][0]
        return {
            "unreachable_s": round(replies[0][0] - t0, 3),
            "lost": replies[0][1] - 1,
            "replies": len(replies),
            "sent": int(REBIND_PING_S / PING_INTERVAL_S),
            "new_public": new_ip,
            "peer_endpoint_before": before["endpoint"],
            "peer_endpoint_after": after_p["endpoint"],
            "route_after": after_p["route"],
            "redirects": (after_p["redirects"], after_n["redirects"]),
        }
    finally:
        for x in (n, p):
            x.stop()


def direct_path_loss_outage(fed: Federation, node_site: Site, peer_site: Site) -> dict:
    """N and P (behind `node_site`, `peer_site`) have a direct tunnel; P pings N every 20 ms. Then
    N's NAT drops all UDP to and from P's NAT (the direct path dies; the DCs and the relay stay
    reachable). `outage_s`: the longest gap between replies; also the route afterwards."""
    p = UpNode(fed, peer_site.host, 1, "--accept-any")
    n = UpNode(fed, node_site.host, 0, "--accept-any")
    rules = [
        [chain, "-p", "udp", flag, peer_site.public4, "-j", "DROP"]
        for chain in ("FORWARD", "INPUT", "OUTPUT")
        for flag in ("-s", "-d")
    ]
    try:
        p.cli("alias", "n", n.id)
        assert p.run("ping", "-6", "-c", "1", "-W", "5", n.v6).returncode == 0
        route_before = p.status()["peers"][0]["route"]

        def cut() -> None:
            time.sleep(CUT_AFTER_S)
            for r in rules:
                fed.lab.exec(node_site.router.ns, ["iptables", "-I", *r], check=True)

        t0, replies = ping_stream(p, n.v6, PATH_LOSS_PING_S, during=cut)
        times = [t0] + [t for t, _ in replies]
        gaps = [b - a for a, b in zip(times, times[1:])]
        after_p, after_n = p.status()["peers"][0], n.status()["peers"][0]
        return {
            "outage_s": round(max(gaps), 3),
            "replies": len(replies),
            "sent": int(PATH_LOSS_PING_S / PING_INTERVAL_S),
            "route_before": route_before,
            "route_after": (after_p["route"], after_n["route"]),
            "redirects": (after_p["redirects"], after_n["redirects"]),
        }
    finally:
        for x in (n, p):
            x.stop()


def idle_move_tells_peer(fed: Federation, mover_site: Site, to_site: Site, peer_host: Host) -> dict:
    """M (behind `mover_site`) has an idle tunnel to P (public). M moves behind `to_site`.
    `noticed_s`: move started → M's log says its addresses changed; then, without P sending
    anything, P's endpoint for M (`peer_endpoint_after`: M's new NAT?) and P's ping stream
    right after (`first_reply_seq` 1: its first ping was answered)."""
    p = UpNode(fed, peer_host, 1, "--accept-any")
    m = UpNode(fed, mover_site.host, 0, "--accept-any")
    try:
        p.cli("alias", "m", m.id)
        assert p.run("ping", "-6", "-c", "1", "-W", "5", m.v6).returncode == 0
        before = p.status()["peers"][0]["endpoint"]
        time.sleep(IDLE_BEFORE_REBIND_S)
        t_move = time.time()
        fed.lab.move(m.host, to_site)
        moved_s = time.time() - t_move
        t_noticed = wait_log(Path(m.log.name), "local addresses changed", t_move, 10)
        after = p.status()["peers"][0]["endpoint"]
        t0, replies = ping_stream(p, m.v6, 1.0)
        return {
            "noticed_s": round(t_noticed - t_move, 3),
            "move_cmds_s": round(moved_s, 3),
            "peer_endpoint_before": before,
            "peer_endpoint_after": after,
            "new_public": to_site.public4,
            "first_reply_seq": replies[0][1] if replies else None,
            "first_reply_s": round(replies[0][0] - t0, 3) if replies else None,
        }
    finally:
        for x in (m, p):
            x.stop()

"""Any link, any MTU (issue 28): set up and measure, for tests/lab/test_lab_mtu.py and bench/mtu.py.

Node A sits behind an EIM NAT whose LAN (A's uplink) has a small MTU, set on A's `eth0`, the
router's LAN bridge and its ports: A's kernel knows its own link, while packets *to* A meet the
small link at A's router, which answers oversize ones (DF set) with ICMP "fragmentation needed",
or, with `icmp=False`, drops them silently (its ICMP errors are dropped, as filtering networks
do). Node B is behind a normal EIM NAT. Both run `ntm up` with TUN; a TCP transfer goes B → A
(a download on the small link) over their overlay IPv6 addresses.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from .fed import Federation
from .topology import Host, Lab
from .upnode import UpNode, transfer

#: A transfer is timed from its sender's start to the receiver's last byte.
MBIT = 1e6 / 8


def set_uplink_mtu(lab: Lab, host: Host, mtu: int) -> None:
    """The MTU of `host`'s uplink (its NAT site's LAN): its eth0, the router's LAN bridge and every
    port of that bridge (a bridge drops frames longer than the port they leave by)."""
    r = host.site.router
    lab.exec(host, ["ip", "link", "set", "eth0", "mtu", str(mtu)], check=True)
    ports = lab.exec(r, ["ip", "-o", "link", "show", "master", "lan"], check=True).stdout
    for line in ports.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        lab.exec(r, ["ip", "link", "set", name, "mtu", str(mtu)], check=True)
    lab.exec(r, ["ip", "link", "set", "lan", "mtu", str(mtu)], check=True)


def drop_icmp_too_big(lab: Lab, host: Host) -> None:
    """The router of `host`'s site sends no ICMP "fragmentation needed": oversize packets towards
    the host vanish (a black hole, as behind a firewall that filters ICMP)."""
    lab._iptables(
        host.site.router.ns, "-A", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP"
    )


def _peer_row(node: UpNode) -> dict:
    return node.status()["peers"][0]


class MtuPair:
    """A behind an EIM NAT whose uplink has MTU `mtu` (its router's ICMP "fragmentation needed"
    dropped unless `icmp`), B behind a normal EIM NAT, both running `ntm up`; B calls A "a". No
    tunnel until the first transfer, whose SYN opens it (its start includes the search)."""

    def __init__(self, fed: Federation, tag: str, mtu: int, icmp: bool) -> None:
        """The sites only (the lab is not thread-safe); `start` brings up the nodes."""
        lab = fed.lab
        self.fed, self.mtu, self.icmp = fed, mtu, icmp
        self.a_host = lab.add_site(f"{tag}a", "eim").host
        self.b_host = lab.add_site(f"{tag}b", "eim").host
        set_uplink_mtu(lab, self.a_host, mtu)
        if not icmp:
            drop_icmp_too_big(lab, self.a_host)
        self.a: UpNode | None = None
        self.b: UpNode | None = None

    @classmethod
    def many(cls, fed: Federation, specs: list[tuple[str, int, bool]], workers: int = 4) -> list[MtuPair]:
        """Pairs for `specs` (tag, mtu, icmp), started: their sites one by one, their nodes'
        registrations and daemons `workers` pairs at once (most of a pair's setup is waiting for
        processes to start)."""
        pairs = [cls(fed, tag, mtu, icmp) for tag, mtu, icmp in specs]
        with ThreadPoolExecutor(workers) as pool:
            errors = [f.exception() for f in [pool.submit(pair.start) for pair in pairs]]
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            for pair in pairs:
                pair.stop()
            raise failed
        return pairs

    def start(self) -> None:
        try:
            a = self.a = UpNode(self.fed, self.a_host, 0, "--accept-any")
            b = self.b = UpNode(self.fed, self.b_host, 1, "--accept-any")
            b.cli("alias", "a", a.id)
        except BaseException:
            self.stop()
            raise

    def transfer(self, nbytes: int) -> dict:
        """A TCP download of `nbytes` B → A: the throughput (`mbps`), whether the bytes arrived
        intact, the longest stall, B's TCP retransmissions, B's inner packets answered "too big" or
        split so far (`b_too_big`), and each side's path MTU."""
        a, b = self.a, self.b
        assert a is not None and b is not None, "stopped"
        retrans0 = _tcp_retransmits(b)
        sent, got = transfer(b, a, a.v6, a.v6, nbytes)
        b_status = b.status()
        b_row, a_row = b_status["peers"][0], _peer_row(a)
        return {
            "mtu": self.mtu,
            "b_too_big": b_status["counters"]["too_big"],
            "icmp": self.icmp,
            "bytes": got["bytes"],
            "intact": got["sha256"] == sent["sha256"] and got["bytes"] == nbytes,
            "mbps": round(got["bytes"] / got["elapsed_s"] / MBIT, 1),
            "max_stall_s": got["max_stall_s"],
            "elapsed_s": got["elapsed_s"],
            "retransmits": _tcp_retransmits(b) - retrans0,
            "b_to_a_path_mtu": b_row["path_mtu"],
            "a_to_b_path_mtu": a_row["path_mtu"],
            "route": b_row["route"],
        }

    def stop(self) -> None:
        for node in (self.a, self.b):
            if node is not None:
                node.stop()
        self.a = self.b = None


def _tcp_retransmits(node: UpNode) -> int:
    """TCP segments retransmitted so far in `node`'s namespace (/proc/net/snmp is per namespace)."""
    rows = [line.split() for line in node.run("cat", "/proc/net/snmp").stdout.splitlines() if line.startswith("Tcp:")]
    return int(dict(zip(rows[0][1:], rows[1][1:]))["RetransSegs"])


def mtu_move(fed: Federation, tag: str, nbytes: int, rate: float, before_s: float = 2.0, inner: int = 6) -> dict:
    """A paced TCP download B → A (over IPv6 or, `inner` 4, IPv4 inside the tunnel) while A moves
    from a 1500 network to one with MTU 1400 whose router drops ICMP: the open connection must
    learn the smaller MTU from the ICMP "too big" B's node answers with. Returns whether it
    survived intact, the longest stall, and `pmtu_discovery_s`: from the move until B's tunnel to
    A runs at the new path MTU: when B's search settled, from `ntm status`'s `mtu_age_s` (the
    daemon and this test read the same system-wide monotonic clock)."""
    lab = fed.lab
    a_host = lab.add_site(f"{tag}1", "eim").host
    lab.add_site(f"{tag}2", "eim", host=f"{tag}2h")
    small = lab.sites[f"{tag}2"]
    set_uplink_mtu(lab, small.host, 1400)
    drop_icmp_too_big(lab, small.host)
    a = UpNode(fed, a_host, 0, "--accept-any")
    b = UpNode(fed, lab.add_site(f"{tag}b", "eim").host, 1, "--accept-any")
    found: dict = {}
    try:
        b.cli("alias", "a", a.id)
        r = b.run("ping", "-6", "-c", "2", "-W", "5", "a.ntm")
        assert r.returncode == 0, r.stdout + r.stderr

        def move() -> None:
            time.sleep(before_s)
            t0 = time.monotonic()
            lab.move(a_host, small)
            set_uplink_mtu(lab, a_host, 1400)
            while time.monotonic() - t0 < 30:
                row = _peer_row(b)
                answered = time.monotonic()  # just after the daemon answered (the CLI then only prints)
                if row["path_mtu"] == 1400 and row["mtu_age_s"] is not None:
                    found.update(pmtu_discovery_s=round(answered - row["mtu_age_s"] - t0, 2), b_row=row)
                    return
                time.sleep(0.1)

        # IPv4 inside: B sees A as the first address of its book, A is itself the pool's first host
        to, bind = (a.v6, a.v6) if inner == 6 else ("100.64.0.2", "100.64.0.1")
        sent, got = transfer(b, a, to, bind, nbytes, rate=rate, during=move)
        return {
            "intact": got["sha256"] == sent["sha256"] and got["bytes"] == nbytes,
            "bytes": got["bytes"],
            "max_stall_s": got["max_stall_s"],
            "pmtu_discovery_s": found.get("pmtu_discovery_s"),
            "b_to_a_path_mtu": _peer_row(b)["path_mtu"],
            "mtu_search_s": found.get("b_row", {}).get("mtu_search_s"),
        }
    finally:
        a.stop()
        b.stop()

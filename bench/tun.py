"""TUN data plane benchmark: iperf3 through `ntm up` vs wireguard-go on the same path; `metric: value`.

Public hosts on the lab's internet bridge (one veth each); the federation (anvil, DCs, relay) in
the lab's server namespace. `ntm up` with TUN offloads (`--offload`) and Debian's wireguard-go
(userspace, like ours, on 10.77.0.0/24) run between the same two namespaces, ours on the virtual
IPv6 addresses (a direct tunnel); `ntm up --no-offload` (the fallback path) runs between two more
public hosts of the same bridge. ROUNDS interleaved rounds of single-stream iperf3 TCP tests of
TEST_S seconds each, so machine noise hits all alike.

  tun_tcp_mbps / tun_tcp_mbps_no_offload /     median over the rounds
    wireguard_go_tcp_mbps
  tun_tcp_ratio_vs_wireguard_go                median of the per-round ratios (target ≥ 4)
  tun_tcp_offload_ratio                        median of per-round offload / no-offload ratios
  tun_tcp_p4_mbps                              iperf3 -P 4 through `ntm up` (offloads), median
  veth_tcp_mbps / tun_tcp_ratio_vs_veth        the same hosts without an overlay (the ceiling)
  tun_relay_tcp_mbps                           a node behind a symmetric NAT to one behind a NAT:
                                               through the relay (offloads on)
  tun_rtt_ms_p50 / wireguard_go_rtt_ms_p50     ping through each overlay (20 pings, 50 ms apart)
  tun_cpu_s_per_gb (…_no_offload) /            CPU seconds of both ends' daemons per GB carried
    wireguard_go_cpu_s_per_gb                  (target ≤ 5 with offloads)
  tun_cpu_kernel_share                         the part of tun_cpu_s_per_gb spent in the kernel
                                               (system time: I/O and the stack work it runs)
  handover_tcp_stall_s                         longest stall of a paced TCP transfer while one
                                               node moves to another NAT (the same connection)
Needs root; installs iperf3, wireguard-go and wireguard-tools with apt when missing.

Both ends share this machine: when the scheduler puts both daemons on one core, a round runs at
about half the speed (issue 23: 59-94% of samples on one core -> 1.3-1.8 Gbit/s, 8-23% -> 2.4-2.7).
`--pin` emulates two one-core machines for every overlay alike: the sending side's processes (its
daemon or wireguard-go, iperf3's client) on CPU 0, the receiving side's on CPU 1 (the relay and
the federation unpinned); the metrics then get a `_pinned` suffix.

usage: sudo .venv/bin/python bench/tun.py [--rounds 3] [--seconds 7] [--quick] [--pin]
`--quick`: one round of 1 s iperf3 tests and a 6 MB handover transfer: the same code paths (make test).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit.lab.fed import Federation  # noqa: E402
from labkit.lab.topology import Lab, lab_available, sweep_stale  # noqa: E402
from labkit.lab.upnode import UpNode, transfer  # noqa: E402

KEEPALIVE_S = 2.0
ROUNDS = 3  # interleaved rounds: a median one noisy round cannot move, inside the 3-minute budget
#: Seconds per iperf3 test: ROUNDS x 5 tests, the relay's test and the lab's setup take ~2.6 min
#: (measured: 10 s tests 3.4 min, over the 3 minutes a bench may take; 8 s tests 2.9).
TEST_S = 7.0
WG_NET = "10.77.0.{}"
WG_PORT = 51820
WG_START_TRIES = 100  # x 50 ms: wireguard-go up and listening on its control socket (5 s)
IPERF_PORT = 5201
APT = {"iperf3": "iperf3", "wireguard-go": "wireguard-go", "wg": "wireguard-tools"}
HANDOVER_BYTES = 12 * 1024 * 1024
QUICK_HANDOVER_BYTES = 6 * 1024 * 1024  # still running when the move comes at 1 s
HANDOVER_RATE = 4e6  # bytes/s: a steady stream, so a stall is visible in the receiver's gaps


#: CPUs of the sending and the receiving side under --pin (two one-core "machines").
SEND_CPU, RECV_CPU = 0, 1
#: Set by --pin: the metrics' suffix, and the sending side's CPU for iperf3's client.
PINNED = {"suffix": "", "client": None}


def metric(name: str, value) -> None:
    print(f"{name}{PINNED['suffix']}: {value}", flush=True)


def pin(pid: int, cpu: int) -> None:
    """Run process `pid` and all its threads on `cpu` only (--pin)."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, capture_output=True)


def install_missing() -> None:
    missing = [pkg for cmd, pkg in APT.items() if shutil.which(cmd) is None]
    if missing:
        print(f"# installing {' '.join(missing)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            env=env,
            check=True,
            capture_output=True,
        )


def cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


class WireGuard:
    """wireguard-go in both namespaces, peered over their public IPv4 addresses. Interface names
    differ per host: wireguard-go's control socket (/var/run/wireguard/NAME.sock) is not per
    namespace."""

    def __init__(self, lab: Lab, hosts) -> None:
        self.lab, self.hosts, self.procs = lab, hosts, []
        keys = []
        for _ in hosts:
            priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
            pub = subprocess.run(
                ["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True
            ).stdout.strip()
            keys.append((priv, pub))
        self.dir = Path(tempfile.mkdtemp(prefix="ntm-bench-wg-"))
        try:
            self._start(keys)
        except BaseException:
            self.close()
            raise

    def _start(self, keys: list[tuple[str, str]]) -> None:
        lab, hosts = self.lab, self.hosts
        names = [f"ntmwg{i}" for i in range(len(hosts))]
        for name, h in zip(names, hosts):
            self.procs.append(
                lab.run(
                    h,
                    ["wireguard-go", "-f", name],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "LOG_LEVEL": "error"},
                )
            )
        for i, h in enumerate(hosts):
            dev = names[i]
            key_file = self.dir / f"wg{i}.key"
            key_file.write_text(keys[i][0])
            other = hosts[1 - i]
            self._when_up(
                h,
                "wg",
                "set",
                dev,
                "private-key",
                str(key_file),
                "listen-port",
                str(WG_PORT),
                "peer",
                keys[1 - i][1],
                "endpoint",
                f"{other.addr4}:{WG_PORT}",
                "allowed-ips",
                WG_NET.format(2 - i) + "/32",
            )
            self._do(h, "ip", "addr", "add", WG_NET.format(i + 1) + "/24", "dev", dev)
            self._do(h, "ip", "link", "set", dev, "up")

    def _when_up(self, h, *argv: str) -> None:
        """`wg set`, retried while wireguard-go is still starting: its control socket appears at
        bind, before it listens, and wg refused there tries the kernel module ("Protocol not
        supported")."""
        for _ in range(WG_START_TRIES):
            if self.lab.exec(h, list(argv)).returncode == 0:
                return
            time.sleep(0.05)
        self._do(h, *argv)

    def _do(self, h, *argv: str) -> None:
        r = self.lab.exec(h, list(argv))
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")

    def close(self) -> None:
        for p in self.procs:
            self.lab.kill(p)
        shutil.rmtree(self.dir, ignore_errors=True)


def iperf(lab: Lab, client, server_addr: str, seconds: float, streams: int = 1) -> float:
    """Mbit/s received by the server in a TCP test of `streams` parallel streams (asked again
    while the server still winds down the previous test)."""
    for _ in range(20):
        cpu = PINNED["client"]
        r = lab.exec(
            client,
            [*(["taskset", "-c", str(cpu)] if cpu is not None else []), "iperf3", "-c", server_addr]
            + ["-p", str(IPERF_PORT), "-t", str(seconds), "-P", str(streams), "-J"],
            timeout=seconds + 30,
        )
        data = json.loads(r.stdout)
        if "busy" not in data.get("error", ""):
            break
        time.sleep(0.25)
    if "error" in data:
        raise RuntimeError(f"iperf3 to {server_addr}: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e6


def open_tunnel(lab: Lab, host, addr: str) -> None:
    """Ping until answered (the tunnel opens on demand: a DC round trip and a handshake)."""
    for _ in range(10):
        if lab.exec(host, ["ping", "-c", "1", "-W", "3", addr], timeout=10).returncode == 0:
            return
    raise RuntimeError(f"no tunnel to {addr}")


def ping_p50(lab: Lab, host, addr: str) -> float:
    r = lab.exec(host, ["ping", "-c", "20", "-i", "0.05", "-W", "2", addr], timeout=30)
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", r.stdout)]
    if not rtts:
        raise RuntimeError(f"no ping replies from {addr}: {r.stdout} {r.stderr}")
    return statistics.median(rtts)


def measure(lab: Lab, a, target: str, pids: list[int], seconds: float, streams: int = 1) -> tuple[float, float, float]:
    """(Mbit/s, CPU s per GB of both ends' daemons, the share of that CPU spent in the kernel:
    TUN and socket I/O, and the network stack work those system calls run) of one iperf3 run."""
    before = [cpu_s(p) for p in pids]
    mbps = iperf(lab, a, target, seconds, streams)
    after = [cpu_s(p) for p in pids]
    user = sum(x[0] - y[0] for x, y in zip(after, before))
    system = sum(x[1] - y[1] for x, y in zip(after, before))
    gb = mbps * 1e6 * seconds / 8 / 1e9
    return mbps, (user + system) / gb if gb else float("nan"), system / (user + system or 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--seconds", type=float, default=TEST_S)
    p.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    p.add_argument("--pin", action="store_true", help="each side on its own CPU, for every overlay alike")
    args = p.parse_args()
    if args.pin:
        PINNED.update(suffix="_pinned", client=SEND_CPU)
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    handover_bytes = QUICK_HANDOVER_BYTES if args.quick else HANDOVER_BYTES
    reason = lab_available()
    if reason:
        print(f"# skipped: {reason}")
        return 0
    install_missing()
    sweep_stale()
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="ntm-bench-tun-") as work:
        fed = Federation(lab, Path(work), n_dcs=1, keepalive_s=KEEPALIVE_S)
        wg = None
        try:
            ha, hb = lab.add_public_host("tuna"), lab.add_public_host("tunb")
            hc, hd = lab.add_public_host("tunc"), lab.add_public_host("tund")
            b = UpNode(fed, hb, 0, "--accept-any", "--offload")
            a = UpNode(fed, ha, 0, "--accept-any", "--offload")
            d = UpNode(fed, hd, 0, "--accept-any", "--no-offload")
            c = UpNode(fed, hc, 0, "--accept-any", "--no-offload")
            if not (a.ready["offload"] and b.ready["offload"]) or c.ready["offload"] or d.ready["offload"]:
                raise RuntimeError("TUN offloads are not on where asked for (or on where not)")
            rb = UpNode(fed, lab.add_site("rlyb", "eim").host, 0, "--accept-any")  # symmetric ↔ NAT: relayed
            r = UpNode(fed, lab.add_site("rly", "symmetric").host, 0, "--accept-any")
            wg = WireGuard(lab, [ha, hb])
            iperf_srvs = [
                lab.run(
                    h, ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                for h in (hb, hd, rb.host)
            ]
            time.sleep(0.3)
            ntm_pids, plain_pids = [a.proc.pid, b.proc.pid], [c.proc.pid, d.proc.pid]
            wg_pids = [pr.pid for pr in wg.procs]
            if args.pin:  # senders (a, c, r, wireguard-go on ha) on one CPU, receivers on the other
                for pids in (ntm_pids, plain_pids, wg_pids, [r.proc.pid, rb.proc.pid]):
                    pin(pids[0], SEND_CPU)
                    pin(pids[1], RECV_CPU)
                for srv in iperf_srvs:
                    pin(srv.pid, RECV_CPU)
            for node, peer in ((a, b), (c, d), (r, rb)):
                node.cli("alias", "b", peer.id)  # the overlay learns the peer's address
                open_tunnel(lab, node.host, peer.v6)
            metric("tun_rtt_ms_p50", round(ping_p50(lab, ha, b.v6), 3))
            metric("wireguard_go_rtt_ms_p50", round(ping_p50(lab, ha, WG_NET.format(2)), 3))
            rows: dict[str, list[float]] = {
                k: []
                for k in (
                    "ours",
                    "plain",
                    "wg",
                    "ratio",
                    "offload_ratio",
                    "cpu_ours",
                    "cpu_plain",
                    "cpu_wg",
                    "p4",
                    "veth",
                    "sys_ours",
                )
            }
            for n in range(args.rounds):
                m1, c1, k1 = measure(lab, ha, b.v6, ntm_pids, args.seconds)
                m0, c0, _ = measure(lab, hc, d.v6, plain_pids, args.seconds)
                m2, c2, _ = measure(lab, ha, WG_NET.format(2), wg_pids, args.seconds)
                p4, _, _ = measure(lab, ha, b.v6, ntm_pids, args.seconds, streams=4)
                veth = iperf(lab, ha, hb.addr4, args.seconds)
                for k, v in zip(rows, (m1, m0, m2, m1 / m2, m1 / m0, c1, c0, c2, p4, veth, k1)):
                    rows[k].append(v)
                print(
                    f"# round {n + 1}: ntm {m1:.0f} Mbit/s ({c1:.1f} CPU-s/GB, {k1:.0%} in the kernel), no offload {m0:.0f} ({c0:.1f}), "
                    f"wireguard-go {m2:.0f} ({c2:.1f}), ntm -P 4 {p4:.0f}, veth {veth:.0f}",
                    flush=True,
                )
            med = {k: statistics.median(v) for k, v in rows.items()}
            metric("tun_tcp_mbps", round(med["ours"], 1))
            metric("tun_tcp_mbps_no_offload", round(med["plain"], 1))
            metric("wireguard_go_tcp_mbps", round(med["wg"], 1))
            metric("tun_tcp_ratio_vs_wireguard_go", round(med["ratio"], 3))
            metric("tun_tcp_offload_ratio", round(med["offload_ratio"], 3))
            metric("tun_tcp_p4_mbps", round(med["p4"], 1))
            metric("veth_tcp_mbps", round(med["veth"], 1))
            metric("tun_tcp_ratio_vs_veth", round(med["ours"] / med["veth"], 4))
            metric("tun_cpu_s_per_gb", round(med["cpu_ours"], 2))
            metric("tun_cpu_s_per_gb_no_offload", round(med["cpu_plain"], 2))
            metric("tun_cpu_kernel_share", round(med["sys_ours"], 3))
            metric("wireguard_go_cpu_s_per_gb", round(med["cpu_wg"], 2))
            metric("tun_relay_tcp_mbps", round(iperf(lab, r.host, rb.v6, args.seconds), 1))
            if r.status()["peers"][0]["route"] != "relay":
                raise RuntimeError("the node behind the symmetric NAT is not relayed")
            for srv in iperf_srvs:
                lab.kill(srv)

            lab.add_site("hoa", "eim")
            lab.add_site("hob", "eim")
            m = UpNode(fed, lab.add_host("hom", "hoa"), 0, "--accept-any")
            m.cli("alias", "b", b.id)

            def move() -> None:
                time.sleep(1.0)
                lab.move("hom", "hob")

            sent, got = transfer(m, b, b.v6, b.v6, handover_bytes, rate=HANDOVER_RATE, during=move)
            if got["sha256"] != sent["sha256"]:
                raise RuntimeError("handover transfer arrived damaged")
            metric("handover_tcp_stall_s", got["max_stall_s"])
        finally:
            if wg is not None:
                wg.close()
            fed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benches that cannot rot: every bench/*.py runs in its quick mode (`--quick`: tiny sizes, the same
code paths) as a subprocess and must exit 0 having printed each metric it documents as a plain
number, so a bench that breaks fails `make test` (README "Benchmarks").

Cost: the selected benches all start with the first of these tests, in two lanes at once (the
loopback benches one at a time, the lab benches, root and network namespaces, two at a time: roam
beside lab then tun); each test waits for its own bench. Measured: see the README.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from labkit.lab.topology import lab_available

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
# A bench that hangs fails its test after this long (the slowest, roam, took 364 s at load average 10).
BENCH_TIMEOUT_S = 600.0
# Benches run this many at a time in each lane: three at once on two cores (roam beside lab then
# tun, beside the loopback benches one by one) fit the suite's budget; four at once, on a machine
# other lab runs load too, starved DC processes past their 20 s start-up limit.
LOOPBACK_AT_ONCE = 1
LAB_AT_ONCE = 2
LINE = re.compile(r"^([a-z][a-z0-9_]*): (.*)$")
NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")

# What each bench documents and must print (in quick mode: groups measures n = 10 only).
METRICS: dict[str, tuple[str, ...]] = {
    "abuse": (
        "forged_handshake_cpu_us",
        "replayed_handshake_cpu_us",
        "junk_datagram_cpu_us",
        "chain_calls_per_random_whois",
        "chain_calls_per_fresh_key_direction",
        "relay_tokens_in_clear",
        "keepalive_log_lines_per_1000_forged",
        "reflection_amplification",
        "reflection_amplification_shared_ip",
        "direction_flood_rss_growth_mb",
        "direction_flood_refused_share",
        "newcomer_registrations_left_after_sybil",
        "connect_p99_ms_under_flood",
        "cs_bytes_over_quota_concurrent",
    ),
    "chain": (
        "confirmed_p50_ms",
        "idle_chain_confirmed_ms",
        "dead_first_rpc_confirmed_p50_ms",
        "rollback_recovery_s",
        "chain_return_confirm_s",
    ),
    "cli": ("cli_help_s", "cli_id_s", "cli_status_s", "ntm_status_s"),
    "cs": (
        "cs_upload_mbps_1mb",
        "cs_download_mbps_1mb",
        "cs_upload_mbps_100mb",
        "cs_download_mbps_100mb",
        "cs_notify_ms_p50",
        "cs_rss_mb_100mb_item",
    ),
    "gas": (
        "gas_first_registration",
        "gas_update",
        "gas_revoke",
        "gas_batch1_per_record",
        "gas_batch10_per_record",
        "gas_batch50_per_record",
        "gas_first_registration_cancun",
        "gas_batch50_per_record_cancun",
        "gas_london_extra_per_record",
    ),
    "groups": ("group_rekey_ms_10", "group_rekey_gms_ms_10", "group_send_fanout_ms_p50", "group_send_fanout_ms_p90"),
    "register": (
        "register_durable_p50_ms",
        "register_durable_p95_ms",
        "register_confirmed_p50_ms",
        "register_confirmed_p95_ms",
        "registrations_per_s",
        "registrations_confirmed_blocks_for_1000",
    ),
    "relay": (
        "table_ops_per_s",
        "direction_ms_p50",
        *(
            f"{m}{mode}"
            for m in (
                "relay_goodput_mbps",
                "relay_pps",
                "relay_cpu_s_per_gb",
                "relay_pps_per_cpu_s",
                "relay_stranger_cpu_us",
            )
            for mode in ("", "_no_offload")
        ),
        "relay_offload_pps_ratio",
    ),
    "scale": (
        "records",
        "dc_import_s",
        "cold_start_s_100k",
        "dc_rss_mb_100k",
        "cold_start_s_100k_snapshot",
        "cold_start_cpu_s_100k",
        "cold_start_cpu_s_100k_snapshot",
        "chain_ready_s",
        "dashboard_ms_100k",
        "metrics_ms_100k",
        "dashboard_cpu_ms_100k",
        "metrics_cpu_ms_100k",
        "registrations_per_s_100k",
        "registration_cpu_ms_100k",
        "sessions_rss_kb_each",
        "directions_per_s_64",
        "direction_p50_ms_64",
        "direction_p99_ms_64",
        "direction_cpu_ms_requester_dc",
        "direction_cpu_ms_peer_dc",
    ),
    "stream": (
        "stream_mbps",
        "stream_relay_mbps",
        "stream_handover_stall_s",
        "tunnel_goodput_mbps",
        "stream_vs_tunnel_ratio",
        "stream_cpu_ms_per_mbit",
        "tunnel_cpu_ms_per_mbit",
    ),
    "tunnel": (
        "payload_bytes",
        "udp_goodput_mbps",
        "udp_pps",
        "tunnel_goodput_mbps",
        "tunnel_pps",
        "tunnel_goodput_ratio_vs_udp",
        "handshake_ms_p50",
        "signal_same_dc_p50_ms",
        "signal_cross_dc_p50_ms",
        "signal_cross_dc_p95_ms",
        "relay_rtt_overhead_ms",
    ),
    # lab benches
    "lab": (
        "keepalive_s",
        *(
            f"{m}_{route}_{unit}"
            for route in ("direct", "nat_initiates", "punch", "relay")
            for m, unit in (("setup", "ms"), ("goodput", "mbps"))
        ),
        "grid_pairs",
        "grid_pairs_ok",
        "handover_s",
        "handover_redirect_s",
        "subnet_route_tcp_mbps",
        "exit_tcp_mbps",
        "exit_handover_stall_s",
        "rs_exit_tcp_mbps",
        "rs_exit_handover_stall_s",
        "failover_s",
    ),
    "mtu": (
        *(
            f"tcp_{first}{m}_mtu{case}"
            for first in ("", "first_")
            for m, cases in (
                ("mbps", ("1500", "1400_icmp", "1400_noicmp", "1280")),
                ("ratio", ("1400_icmp", "1400_noicmp", "1280")),
            )
            for case in cases
        ),
        "pmtu_discovery_s",
        "pmtu_move_stall_s",
    ),
    "roam": (
        "udp_blocked_setup_s",
        "tcp_transport_mbps",
        "udp_back_stall_s",
        "dc_link_loss_failover_s",
        "dc_link_loss_new_tunnel_s",
        "nat_rebind_unreachable_s",
        "make_before_break_lost_packets",
        "setup_direct_share_loss5",
        "setup_p90_s_loss20",
    ),
    "tun": (
        "tun_rtt_ms_p50",
        "wireguard_go_rtt_ms_p50",
        "tun_tcp_mbps",
        "tun_tcp_mbps_no_offload",
        "wireguard_go_tcp_mbps",
        "tun_tcp_ratio_vs_wireguard_go",
        "tun_tcp_offload_ratio",
        "tun_tcp_p4_mbps",
        "veth_tcp_mbps",
        "tun_tcp_ratio_vs_veth",
        "tun_cpu_s_per_gb",
        "tun_cpu_s_per_gb_no_offload",
        "tun_cpu_kernel_share",
        "wireguard_go_cpu_s_per_gb",
        "tun_relay_tcp_mbps",
        "handover_tcp_stall_s",
    ),
}
# Metrics a loopback bench prints only where the lab runs (root, namespaces): its lab scenario.
LAB_METRICS: dict[str, tuple[str, ...]] = {"abuse": ("secrets_in_clear", "injected_directions_acted_on")}
LAB_BENCHES = ("roam", "lab", "mtu", "tun")  # need root and network namespaces; the longest first
BENCHES = [b for b in METRICS if b not in LAB_BENCHES] + list(LAB_BENCHES)
lab_reason = functools.cache(lab_available)  # None where the lab can run (it builds a namespace to see)


class Runs:
    """Starts the selected benches at once in their lanes; result(name) waits for one."""

    def __init__(self, names: list[str], lab_ok: bool) -> None:
        self.t0 = time.monotonic()
        self.loopback = ThreadPoolExecutor(LOOPBACK_AT_ONCE, thread_name_prefix="bench")
        self.lab = ThreadPoolExecutor(LAB_AT_ONCE, thread_name_prefix="bench-lab")
        self.futures: dict[str, Future] = {}
        for name in names:
            if name in LAB_BENCHES and not lab_ok:
                continue
            self.futures[name] = (self.lab if name in LAB_BENCHES else self.loopback).submit(run_bench, name)

    def result(self, name: str) -> tuple[subprocess.CompletedProcess, float]:
        return self.futures[name].result()

    def close(self) -> None:
        for pool in (self.loopback, self.lab):
            pool.shutdown(wait=True, cancel_futures=True)
        print(f"\nbench quick modes: {time.monotonic() - self.t0:.0f} s wall in all")


def run_bench(name: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(BENCH_DIR / f"{name}.py"), "--quick"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=BENCH_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "NTM_PASSPHRASE": ""},
        )
    except subprocess.TimeoutExpired as exc:
        proc = subprocess.CompletedProcess(exc.cmd, -1, exc.stdout or "", f"timed out after {BENCH_TIMEOUT_S} s")
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def runs(request):
    here = request.module.__name__
    selected = [
        item.callspec.params["bench"]
        for item in request.session.items
        if item.module.__name__ == here and hasattr(item, "callspec")
    ]
    r = Runs(selected, lab_reason() is None)
    yield r
    r.close()


def metrics_of(stdout: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if m := LINE.match(line):
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def test_every_bench_is_run_here():
    """A new bench/*.py must be listed in METRICS with the names it prints, or it is not run."""
    assert {p.stem for p in BENCH_DIR.glob("*.py")} == set(METRICS)


def test_metrics_parser_refuses_what_is_no_plain_number():
    got = metrics_of("# a comment\nx_s: 1.5\ny_mbps: nan\nz: 3e-05\nbench/lab.py skipped: no root\n")
    assert got == {"x_s": ["1.5"], "y_mbps": ["nan"], "z": ["3e-05"]}
    assert [bool(NUMBER.match(v[0])) for v in got.values()] == [True, False, True]


@pytest.mark.timeout(BENCH_TIMEOUT_S + 300)  # it may wait behind the other benches of its lane
@pytest.mark.parametrize("bench", BENCHES)
def test_bench_quick_mode_prints_its_metrics(bench, runs):
    """Hostile condition: the code a bench calls changed under it (a renamed function, a new
    argument, a changed default) and the bench was not run. Exit 0, every documented metric once,
    each a plain number."""
    if bench in LAB_BENCHES and (reason := lab_reason()):
        pytest.skip(reason)
    proc, seconds = runs.result(bench)
    print(f"\nbench/{bench}.py --quick: {seconds:.1f} s")
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"bench/{bench}.py exit {proc.returncode}:\n{tail}"
    got = metrics_of(proc.stdout)
    for name in METRICS[bench] + (() if lab_reason() else LAB_METRICS.get(bench, ())):
        times = len(got.get(name, []))
        assert times == 1, f"bench/{bench}.py printed {name} {times} times:\n{proc.stdout}"
        assert NUMBER.match(got[name][0]), f"bench/{bench}.py: {name}: {got[name][0]!r} is no plain number"

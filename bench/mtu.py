"""Any link, any MTU (issue 28): the real system (anvil, DCs, relay, `ntm up` daemons with TUN)
through real NATs in network namespaces; node A's uplink has a small MTU; `metric: value` lines.

  tcp_mbps_mtu1500         TCP download B → A over the overlay (IPv6 inside), A's uplink MTU 1500
  tcp_mbps_mtu1400_icmp    ... uplink MTU 1400, its router sends ICMP "fragmentation needed"
  tcp_mbps_mtu1400_noicmp  ... uplink MTU 1400, its router drops those ICMP errors (black hole)
  tcp_mbps_mtu1280         ... uplink MTU 1280, ICMP dropped (IPv6's floor: below it, split)
  tcp_ratio_mtu1400_icmp   ... each case / the 1500 case of the same round (the target: ≥ 0.8)
  tcp_ratio_mtu1400_noicmp
  tcp_ratio_mtu1280
  tcp_first_mbps_*         the first download of each pair, whose SYN opens the tunnel: its start
  tcp_first_ratio_*        includes the handshake and the path MTU search (ratio as above)
  pmtu_discovery_s         A moves mid-download from a 1500 network to a 1400 one that drops ICMP
                           → B's tunnel to A runs at path MTU 1400 (as `ntm status` shows it)
  pmtu_move_stall_s        ... the longest stall of that TCP download

Every case has its own pair of nodes, set up once; the downloads then go in ROUNDS rounds, the
cases interleaved (each round in a rotated order), so a machine loaded by others weighs on all
cases alike; throughputs are medians over the rounds, ratios the medians of each round's ratio.
All share one federation (one chain, two DCs, a relay). `--quick`: 2 MB transfers and one round,
the same code paths. Needs root and network namespaces (skips with a message otherwise). Takes
about 2.5 minutes.

usage: sudo .venv/bin/python bench/mtu.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit.lab.fed import Federation  # noqa: E402
from labkit.lab.roam_mtu import MtuPair, mtu_move  # noqa: E402
from labkit.lab.topology import Lab, lab_ready  # noqa: E402

KEEPALIVE_S = 2.0  # as the lab tests
#: The move's download is paced so that it still runs when A moves (2 s in).
MOVE_RATE = 4e6
#: Rounds of interleaved downloads after the first: enough for a median on a loaded machine.
ROUNDS = 5
CASES = (
    ("mtu1500", 1500, True),
    ("mtu1400_icmp", 1400, True),
    ("mtu1400_noicmp", 1400, False),
    ("mtu1280", 1280, False),
)


def metric(name: str, value) -> None:
    print(f"{name}: {value}", flush=True)


def report(prefix: str, rounds: list[dict[str, float]]) -> None:
    """Median throughput per case, and the median of each round's ratio to the 1500 case."""
    base = CASES[0][0]
    for name, *_ in CASES:
        metric(f"{prefix}mbps_{name}", round(statistics.median(r[name] for r in rounds), 1))
    for name, *_ in CASES[1:]:
        metric(f"{prefix}ratio_{name}", round(statistics.median(r[name] / r[base] for r in rounds), 2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    args = ap.parse_args()
    if not lab_ready("bench/mtu.py"):
        return 0
    nbytes = (2 if args.quick else 20) * 1_000_000
    rounds = 1 if args.quick else ROUNDS
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ntm-bench-mtu-") as tmp:
        with Lab() as lab, Federation(lab, Path(tmp) / "mtu", n_dcs=2, keepalive_s=KEEPALIVE_S) as fed:
            pairs = dict(
                zip(
                    (name for name, *_ in CASES),
                    MtuPair.many(fed, [(f"b{mtu}{'i' if icmp else 'n'}", mtu, icmp) for _, mtu, icmp in CASES]),
                )
            )
            try:
                results: list[dict[str, float]] = []
                for i in range(rounds + 1):  # round 0: the first download of each pair
                    order = CASES[i % len(CASES) :] + CASES[: i % len(CASES)]
                    results.append({})
                    for name, *_ in order:
                        r = pairs[name].transfer(nbytes)
                        if not r["intact"]:
                            print(f"# {name}: the transfer did not arrive intact: {r}", flush=True)
                        print(
                            f"# round {i} {name}: {r['mbps']} Mbit/s, {r['retransmits']} TCP retransmissions, "
                            f"longest stall {r['max_stall_s']} s, {r['b_too_big']} too big so far, "
                            f"path MTU {r['b_to_a_path_mtu']}",
                            flush=True,
                        )
                        results[i][name] = r["mbps"]
            finally:
                for pair in pairs.values():
                    pair.stop()
            report("tcp_", results[1:])
            report("tcp_first_", results[:1])
            m = mtu_move(fed, "bmv", max(nbytes, int(MOVE_RATE * 4)), MOVE_RATE)
            metric("pmtu_discovery_s", m["pmtu_discovery_s"])
            metric("pmtu_move_stall_s", m["max_stall_s"])
    print(f"# bench/mtu.py took {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

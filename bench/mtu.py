"""Any link, any MTU (issue 28): the real system (anvil, DCs, relay, `ntm up` daemons with TUN)
through real NATs in network namespaces; node A's uplink has a small MTU; `metric: value` lines.

  tcp_mbps_mtu1500         TCP download B → A over the overlay (IPv6 inside), A's uplink MTU 1500
  tcp_mbps_mtu1400_icmp    ... uplink MTU 1400, its router sends ICMP "fragmentation needed"
  tcp_mbps_mtu1400_noicmp  ... uplink MTU 1400, its router drops those ICMP errors (black hole)
  tcp_mbps_mtu1280         ... uplink MTU 1280, ICMP dropped (IPv6's floor: split in the tunnel)
  pmtu_discovery_s         A moves mid-download from a 1500 network to a 1400 one that drops ICMP
                           → B's tunnel to A runs at path MTU 1400 (as `ntm status` shows it)
  pmtu_move_stall_s        ... the longest stall of that TCP download

Target (issue 28): each throughput within 20% of the 1500 case of the same run. All scenarios
share one federation (one chain, two DCs, a relay); each has its own sites and nodes.
`--quick`: 2 MB transfers instead of 20 MB, the same code paths. Needs root and network
namespaces (skips with a message otherwise). Takes about 2 minutes.

usage: sudo .venv/bin/python bench/mtu.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.lab.fed import Federation  # noqa: E402
from tests.lab.roam_mtu import mtu_move, mtu_transfer  # noqa: E402
from tests.lab.topology import Lab, lab_available, sweep_stale  # noqa: E402

KEEPALIVE_S = 2.0  # as the lab tests
#: The move's download is paced so that it still runs when A moves (2 s in).
MOVE_RATE = 4e6
CASES = (("tcp_mbps_mtu1500", 1500, True), ("tcp_mbps_mtu1400_icmp", 1400, True),
         ("tcp_mbps_mtu1400_noicmp", 1400, False), ("tcp_mbps_mtu1280", 1280, False))


def metric(name: str, value) -> None:
    print(f"{name}: {value}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    args = ap.parse_args()
    reason = lab_available()
    if reason:
        print(f"bench/mtu.py skipped: {reason}")
        return 0
    sweep_stale()
    nbytes = (2 if args.quick else 20) * 1_000_000
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ntm-bench-mtu-") as tmp:
        with Lab() as lab, Federation(lab, Path(tmp) / "mtu", n_dcs=2, keepalive_s=KEEPALIVE_S) as fed:
            for name, mtu, icmp in CASES:
                r = mtu_transfer(fed, f"b{mtu}{'i' if icmp else 'n'}", mtu, icmp, nbytes)
                if not r["intact"]:
                    print(f"# {name}: the transfer did not arrive intact: {r}", flush=True)
                metric(name, r["mbps"])
            m = mtu_move(fed, "bmv", max(nbytes, int(MOVE_RATE * 4)), MOVE_RATE)
            metric("pmtu_discovery_s", m["pmtu_discovery_s"])
            metric("pmtu_move_stall_s", m["max_stall_s"])
    print(f"# bench/mtu.py took {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reachable from any network, never silent for long (issue 22): the real system (anvil, DCs, relay,
`ntm up` daemons with TUN) through real NATs in network namespaces; `metric: value` lines.

  udp_blocked_setup_s              a node in a network that lets out only DNS and TCP 80/443:
                                   `ntm up` started → first overlay ping answered (relay over TCP)
  tcp_transport_mbps               a TCP transfer over that tunnel (the relay's TCP stream)
  udp_back_stall_s                 UDP let out again during a transfer: longest stall of the same
                                   TCP connection while the tunnel moves to a punched UDP path
  dc_link_loss_failover_s          the home DC's link dropped (no RST) under a transfer → the
                                   node has registered at another DC
  dc_link_loss_new_tunnel_s        ... → a third node's first ping through a new tunnel answered
  nat_rebind_unreachable_s         the node's NAT rebinds while the tunnel is idle → the peer's
                                   pings answered again
  make_before_break_lost_packets   two uplinks, the first goes down under a 100 pkt/s UDP stream
                                   each way behind EIM NATs: packets lost (the larger direction)
  setup_direct_share_loss5         share of fresh tunnel setups that end direct at 5% loss
  setup_p90_s_loss20               p90 tunnel setup time at 20% loss

Two federations (one chain, two DCs, a relay each): the lab's short keepalive for most scenarios,
the default keepalive for dead-DC detection and NAT rebinding (last: it cuts a DC's link).
`--quick` (make test): all scenarios in one federation at the short keepalive interval, smaller
transfers, a shorter stream and fewer setups: the same code paths.
Needs root and network namespaces (skips with a message otherwise).

usage: sudo .venv/bin/python bench/roam.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.agent import KEEPALIVE_INTERVAL_S  # noqa: E402
from labkit.lab.fed import Federation  # noqa: E402
from labkit.lab.roam_deadpath import CUT_TRANSFER_BYTES, dc_link_loss_failover, nat_rebind_unreachable  # noqa: E402
from labkit.lab.roam_loss import bench_numbers  # noqa: E402
from labkit.lab.roam_mbb import make_before_break  # noqa: E402
from labkit.lab.roam_udp import udp_blocked  # noqa: E402
from labkit.lab.topology import Lab, lab_ready  # noqa: E402

KEEPALIVE_S = 2.0  # as most lab tests: NAT timeouts there are short
# --quick: the failover is measured under a shorter transfer (it need not outlast the failover).
QUICK_CUT_TRANSFER_BYTES = 4 * 1024 * 1024


def metric(name: str, value) -> None:
    print(f"{name}: {value}", flush=True)


def federation(lab: Lab, tmp: str, name: str, keepalive_s: float = KEEPALIVE_S) -> Federation:
    return Federation(lab, Path(tmp) / name, n_dcs=2, keepalive_s=keepalive_s)


def udp(lab: Lab, fed: Federation, quick: bool) -> None:
    r = udp_blocked(fed, (2 if quick else 20) * 1024 * 1024)
    metric("udp_blocked_setup_s", round(r["setup_s"], 2))
    metric("tcp_transport_mbps", round(r["tcp"]["mbps"], 1))
    metric("udp_back_stall_s", r["move"]["stall_s"])


def dead(lab: Lab, fed: Federation, quick: bool) -> None:
    hosts = [lab.add_site(f"d{x}", "eim").host for x in "xyz"]
    d = dc_link_loss_failover(fed, *hosts, QUICK_CUT_TRANSFER_BYTES if quick else CUT_TRANSFER_BYTES)
    metric("dc_link_loss_failover_s", d["failover_s"])
    metric("dc_link_loss_new_tunnel_s", d["new_tunnel_s"])
    n = nat_rebind_unreachable(fed, lab.add_site("rn", "eim"), lab.add_site("rp", "eim"))
    metric("nat_rebind_unreachable_s", n["unreachable_s"])


def mbb(lab: Lab, fed: Federation, quick: bool) -> None:
    m = make_before_break(fed, before_s=1.5, after_s=1.5) if quick else make_before_break(fed)
    metric("make_before_break_lost_packets", m["make_before_break_lost_packets"])


def loss(lab: Lab, fed: Federation, quick: bool) -> None:
    s = bench_numbers(fed, 3 if quick else 20)
    metric("setup_direct_share_loss5", round(s["setup_direct_share_loss5"], 2))
    metric("setup_p90_s_loss20", round(s["setup_p90_s_loss20"], 2))


# Scenarios by federation: the lab's short keepalive (NAT timeouts there are short) for most;
# dead-peer detection and rebinding as users get them, at the default keepalive interval, last
# (it cuts a DC's link).
FEDERATIONS = (("short", KEEPALIVE_S, (udp, mbb, loss)), ("default", KEEPALIVE_INTERVAL_S, (dead,)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    args = ap.parse_args()
    if not lab_ready("bench/roam.py"):
        return 0
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ntm-bench-roam-") as tmp:
        if args.quick:  # one federation for all: starting one takes ~17 s on a loaded 2-core machine
            with Lab() as lab, federation(lab, tmp, "quick") as fed:
                for _, _, scenarios in FEDERATIONS:
                    for scenario in scenarios:
                        scenario(lab, fed, True)
        else:
            for name, keepalive_s, scenarios in FEDERATIONS:
                with Lab() as lab, federation(lab, tmp, name, keepalive_s) as fed:
                    for scenario in scenarios:
                        scenario(lab, fed, False)
    print(f"# bench/roam.py took {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""NAT lab benchmark: the real system through real NATs in network namespaces; `metric: value` lines.

  setup_<route>_ms        median time of Node.connect (Direction Request → tunnel up) over ROUNDS
                          fresh tunnels, for direct (public–public), nat_initiates (public → EIM),
                          punch (EIM–EIM) and relay (symmetric–symmetric)
  goodput_<route>_mbps    payload delivered in BLAST_S of an unpaced 1200-byte datagram flood (one
                          Python sender; the receiver counts what arrived)
  handover_s              longest gap between delivered chunks of a reliable transfer while the
                          sender moves NAT → public → NAT (roaming, no new direction)
  handover_redirect_s     same, the sender moving public → NAT while its peer sits behind a NAT
                          with a home-router firewall (needs a new direction through the DCs)
  failover_s              home DC SIGKILLed → a node at another DC has a tunnel to the node again
  keepalive_s             keepalive interval used in the lab (agent default: 25 s)
  subnet_route_tcp_mbps   TCP goodput (SUBNET_BYTES, unpaced) from a node N behind a NAT to a plain
                          host H on the LAN of a subnet router R behind another NAT (`ntm up`
                          --advertise-routes / --use-routes, TUN; issue 24)
  exit_tcp_mbps           TCP goodput (SUBNET_BYTES, unpaced) from M behind a NAT to a plain public
                          server S through exit node E behind another NAT (--advertise-exit /
                          --exit-node)
  exit_handover_stall_s   longest receive gap at S of a paced TCP transfer through E while M moves
                          NAT → NAT
  rs_exit_tcp_mbps        the same through the relay's exit (`ntm-rs --exit`, `ntm up --exit-relay`;
  rs_exit_handover_stall_s  §10.13): M's DC books it, S sees the relay's address
  grid_pairs              ordered NAT-kind pairs tried (16)
  grid_pairs_ok           ... whose route and carrying path match the table
                          (the grid itself is printed as `#` lines)
Targets: handover_s ≤ 1; failover_s ≤ 2 × keepalive_s. Needs root (skips with a message otherwise).

usage: sudo .venv/bin/python bench/lab.py [--rounds 5] [--blast 1.0] [--quick]
`--quick`: one setup per route and 0.2 s floods: the same code paths (make test).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit.lab.fed import KINDS, Federation, grid_rows, grid_table  # noqa: E402
from labkit.lab.subnet import (
    H_ADDR,
    exit_pair,
    relay_exit_args,
    relay_exit_user,
    subnet_router,  # noqa: E402
    wait_for_route,
)
from labkit.lab.topology import Lab, lab_ready  # noqa: E402
from labkit.lab.upnode import transfer  # noqa: E402

KEEPALIVE_S = 2.0
SUBNET_BYTES = 20 * 1024 * 1024  # as the lab test; --quick sends 1/20 of it
EXIT_MOVE_S = 4.0  # the paced transfer through the exit lasts this long, M moving half-way


def metric(name: str, value) -> None:
    print(f"{name}: {value}", flush=True)


def open_tunnel(a, b):
    ta = a.call("connect", peer=b.id)
    tb = b.next_event("accepted", tunnel=ta["tunnel"])
    return ta, tb


def setup_and_goodput(a, b, route: str, rounds: int, blast_s: float) -> None:
    setups = []
    for _ in range(rounds):
        ta, tb = open_tunnel(a, b)
        assert ta["kind"] == route, (route, ta)
        setups.append(ta["setup_ms"])
        a.call("exchange", tunnel=ta["tunnel"], count=1)
        a.call("close", tunnel=ta["tunnel"])
        b.call("close", tunnel=tb["tunnel"])
    metric(f"setup_{route}_ms", round(statistics.median(setups), 2))
    ta, tb = open_tunnel(a, b)
    sent = a.call("blast", tunnel=ta["tunnel"], seconds=blast_s, size=1200, timeout=blast_s + 10)
    time.sleep(0.2)
    rx = b.call("received", tunnel=tb["tunnel"])
    mbps = rx["blast_bytes"] * 8 / max(rx["blast_s"], sent["elapsed"]) / 1e6  # delivered / time sending
    metric(f"goodput_{route}_mbps", round(mbps, 1))
    print(f"# {route}: via {ta['via']}, path {ta['peer_addr']}", flush=True)


def handover(fed, lab, mover, peer, moves) -> float:
    ta, tb = open_tunnel(mover, peer)
    mover.call("transfer", tunnel=ta["tunnel"], chunks=2500, size=1000, rate=1000.0)
    t0 = time.monotonic()
    for at, fn in moves:
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        fn()
    res = mover.call("transfer_result", tunnel=ta["tunnel"], timeout=60)
    rx = peer.call("received", tunnel=tb["tunnel"])
    assert rx["done"] and rx["sha256"] == res["sha256"], "transfer corrupted"
    return rx["max_gap"]


def failover(fed, lab) -> float:
    f = fed.node(lab.add_site("fo", "eim").host, dc=2)
    p = fed.node(lab.add_public_host("fop"), dc=1)
    t0 = time.monotonic()
    fed.kill_dc(2)
    while time.monotonic() - t0 < 20:
        try:
            t = p.call("connect", peer=f.id, timeout=10)
            f.next_event("accepted", tunnel=t["tunnel"])
            return time.monotonic() - t0
        except RuntimeError:
            time.sleep(0.1)
    raise RuntimeError("node not reachable again within 20 s")


def subnet_route(fed, nbytes: int) -> float:
    """Mbit/s of one TCP transfer N → H through R's subnet route (labkit/lab/subnet.py)."""
    r, h, n = subnet_router(fed, "sr")
    try:
        routes = wait_for_route(n, r)
        assert routes["accepted"], routes
        sent, got = transfer(n, h, H_ADDR, "0.0.0.0", nbytes)
        assert got["sha256"] == sent["sha256"], "transfer corrupted"
        return nbytes * 8 / got["elapsed_s"] / 1e6
    finally:
        n.stop()
        r.stop()


def exit_transfers(lab, m, s, move_to: str, nbytes: int) -> tuple[float, float]:
    """(Mbit/s unpaced, the longest stall while M moves to site `move_to`) of TCP M → S."""
    sent, got = transfer(m, s, s.addr4, "0.0.0.0", nbytes)
    assert got["sha256"] == sent["sha256"], "transfer corrupted"
    rate = nbytes / EXIT_MOVE_S  # paced to last EXIT_MOVE_S, the move in its middle
    sent, moved = transfer(
        m,
        s,
        s.addr4,
        "0.0.0.0",
        nbytes,
        rate=rate,
        during=lambda: (time.sleep(EXIT_MOVE_S / 2), lab.move(m.host, move_to)),
    )
    assert moved["sha256"] == sent["sha256"], "transfer corrupted"
    return nbytes * 8 / got["elapsed_s"] / 1e6, moved["max_stall_s"]


def exit_node(fed, lab, nbytes: int) -> tuple[float, float]:
    """exit_transfers through exit node E, M moving NAT → NAT."""
    lab.add_site("xm2", "eim")
    s = lab.add_public_host("xs")
    e, m = exit_pair(fed, "xe", s.addr4)
    try:
        return exit_transfers(lab, m, s, "xm2", nbytes)
    finally:
        m.stop()
        e.stop()


def relay_exit(fed, lab, nbytes: int) -> tuple[float, float]:
    """exit_transfers through the relay's exit, M moving NAT → NAT."""
    lab.add_site("rxm2", "eim")
    s = lab.add_public_host("rxs")
    m = relay_exit_user(fed, lab.add_site("rxm", "eim").host, s.addr4)
    try:
        return exit_transfers(lab, m, s, "rxm2", nbytes)
    finally:
        m.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--blast", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.blast = 1, 0.2
    if not lab_ready("bench/lab.py"):
        return 0
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ntm-bench-lab-") as tmp, Lab() as lab:
        fed = Federation(
            lab, Path(tmp), n_dcs=3, keepalive_s=KEEPALIVE_S, rs_args=relay_exit_args(Path(tmp) / "rs-exit")
        )
        try:
            metric("keepalive_s", KEEPALIVE_S)
            pub1 = fed.node(lab.add_site("pub1", "public").host, dc=0)
            pub2 = fed.node(lab.add_site("pub2", "public").host, dc=1)
            eim1 = fed.node(lab.add_site("eim1", "eim").host, dc=0)
            eim2 = fed.node(lab.add_site("eim2", "eim").host, dc=1)
            sym1 = fed.node(lab.add_site("sym1", "symmetric").host, dc=0)
            sym2 = fed.node(lab.add_site("sym2", "symmetric").host, dc=1)
            setup_and_goodput(pub1, pub2, "direct", args.rounds, args.blast)
            setup_and_goodput(pub1, eim2, "nat_initiates", args.rounds, args.blast)
            setup_and_goodput(eim1, eim2, "punch", args.rounds, args.blast)
            setup_and_goodput(sym1, sym2, "relay", args.rounds, args.blast)
            v61 = fed.node(lab.add_site("v61", "ipv6only").host, dc=0)
            v62 = fed.node(lab.add_site("v62", "ipv6only").host, dc=1)
            nodes = {
                ("public", 1): pub1,
                ("public", 2): pub2,
                ("eim", 1): eim1,
                ("eim", 2): eim2,
                ("symmetric", 1): sym1,
                ("symmetric", 2): sym2,
                ("ipv6only", 1): v61,
                ("ipv6only", 2): v62,
            }
            rows = grid_rows(fed, nodes, 1)
            print("# NAT-type grid (one tunnel per ordered pair; tests/lab runs 5):")
            print("\n".join("# " + line for line in grid_table(rows).splitlines()), flush=True)
            metric("grid_pairs", len(rows))
            metric("grid_pairs_ok", sum(r["ok"] for r in rows))
            assert len(rows) == len(KINDS) ** 2

            lab.add_site("mna", "eim")
            lab.add_site("mnb", "eim")
            mob = fed.node(lab.add_host("mob1", "mna"), dc=0)
            gap = handover(
                fed, lab, mob, pub2, [(0.8, lambda: lab.move("mob1", None)), (1.6, lambda: lab.move("mob1", "mnb"))]
            )
            metric("handover_s", round(gap, 3))
            lab.add_site("mnc", "eim")
            mob2 = fed.node(lab.add_public_host("mob2"), dc=0)
            gap = handover(fed, lab, mob2, eim2, [(0.8, lambda: lab.move("mob2", "mnc"))])
            metric("handover_redirect_s", round(gap, 3))
            metric("subnet_route_tcp_mbps", round(subnet_route(fed, SUBNET_BYTES // (20 if args.quick else 1)), 1))
            mbps, stall = exit_node(fed, lab, SUBNET_BYTES // (20 if args.quick else 1))
            metric("exit_tcp_mbps", round(mbps, 1))
            metric("exit_handover_stall_s", round(stall, 3))
            mbps, stall = relay_exit(fed, lab, SUBNET_BYTES // (20 if args.quick else 1))
            metric("rs_exit_tcp_mbps", round(mbps, 1))
            metric("rs_exit_handover_stall_s", round(stall, 3))
            metric("failover_s", round(failover(fed, lab), 3))
        finally:
            fed.stop()
    print(
        f"# lab bench took {time.monotonic() - t_start:.1f} s; namespaces left: "
        f"{sum(1 for _ in os.popen('ip netns list'))}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

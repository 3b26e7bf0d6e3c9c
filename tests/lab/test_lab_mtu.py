"""Any link, any MTU (issue 28): real NATs, DCs, relay and `ntm up` daemons with TUN; A's uplink
has a small MTU and its router answers oversize packets with ICMP or drops them silently. The
scenarios are labkit/lab/roam_mtu.py's (bench/mtu.py reuses them)."""

from __future__ import annotations

import pytest

from labkit.lab.fed import Federation
from labkit.lab.roam_mtu import MtuPair, mtu_move

pytestmark = pytest.mark.lab

KEEPALIVE_S = 2.0
TRANSFER_BYTES = 20_000_000
# The move's transfer is paced (4 MB/s) so that it is still running when A moves.
MOVE_BYTES, MOVE_RATE = 20_000_000, 4e6
# Longest a TCP download may stall when its path shrinks behind a router that drops ICMP: the
# peer notices the move (A's first packet from its new address), one probe round settles the new
# MTU, and TCP's retransmission timer (backed off while nothing got through) sends again. Before
# this work the transfer never finished (0-0.1 Mbit/s).
MAX_MOVE_STALL_S = 6.0


#: The matrix: A's uplink MTU and whether its router sends ICMP "fragmentation needed".
CASES = [(1500, True), (1492, True), (1492, False), (1400, True), (1400, False), (1280, True), (1280, False)]


@pytest.fixture(scope="module")
def fed(lab_shared, tmp_path_factory):
    with Federation(lab_shared, tmp_path_factory.mktemp("mtufed"), n_dcs=2, keepalive_s=KEEPALIVE_S) as f:
        yield f


@pytest.fixture(scope="module")
def pairs(fed):
    """One pair of nodes per case, set up together before the first case, several at once (their
    setup, not the transfers, was most of the matrix's time); each case's download opens its tunnel."""
    made = MtuPair.many(fed, [(f"m{mtu}{'i' if icmp else 'n'}", mtu, icmp) for mtu, icmp in CASES])
    yield dict(zip(CASES, made))
    for pair in made:
        pair.stop()


# The first case also sets up every pair (72 s of 105 at load 4; the suite's 300 s would not
# cover that on a machine loaded by others).
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mtu,icmp", CASES)
def test_tcp_download_over_a_small_uplink_arrives_intact(pairs, mtu, icmp):
    """Hostile condition: A's uplink is smaller than Ethernet (PPPoE 1492, a VPN 1400, an IPv6
    tunnel 1280), and with `icmp` off its router drops the "fragmentation needed" errors, so
    full-size tunnel packets towards A vanish silently. 20 MB of TCP, whose SYN opens the tunnel,
    must arrive intact, and the peer's tunnel must have found the path MTU by probing."""
    r = pairs[(mtu, icmp)].transfer(TRANSFER_BYTES)
    print(
        f"\nuplink MTU {mtu}, ICMP {'allowed' if icmp else 'dropped'}: {r['mbps']} Mbit/s, "
        f"longest stall {r['max_stall_s']} s, {r['retransmits']} TCP retransmissions, {r['b_too_big']} too big, "
        f"path MTU B→A {r['b_to_a_path_mtu']}, A→B {r['a_to_b_path_mtu']}"
    )
    assert r["intact"], r
    assert r["b_to_a_path_mtu"] == mtu and r["a_to_b_path_mtu"] == mtu, r


@pytest.mark.parametrize("inner", [6, 4])
def test_tcp_survives_a_move_to_a_smaller_network_without_icmp(fed, inner):
    """Hostile condition: mid-download, A moves from a 1500 network to one with MTU 1400 whose
    router drops ICMP: every full-size packet to A is lost until the peer's tunnel finds the new
    MTU, and the open connection (IPv6 or IPv4 inside) must then shrink its segments on the ICMP
    "too big" / "fragmentation needed" B's node answers with. It must survive, intact, with a
    bounded stall."""
    r = mtu_move(fed, f"mv{inner}", MOVE_BYTES, MOVE_RATE, inner=inner)
    print(
        f"\nmove 1500 → 1400 (ICMP dropped) mid-transfer, IPv{inner} inside: stall {r['max_stall_s']} s, "
        f"new MTU in use after {r['pmtu_discovery_s']} s (search {r['mtu_search_s']} s), "
        f"path MTU B→A {r['b_to_a_path_mtu']}"
    )
    assert r["intact"], r
    assert r["b_to_a_path_mtu"] == 1400, r
    assert r["max_stall_s"] <= MAX_MOVE_STALL_S, r

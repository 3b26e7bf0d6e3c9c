"""Dead-path detection and roaming that tells peers at once (issue 22 items 2, 3): real anvil, DCs,
relay and `ntm up` daemons with TUN behind real NATs, default keepalive (25 s). The scenarios
and their measurements live in labkit/lab/roam_deadpath.py (bench/roam.py reuses them).
"""

from __future__ import annotations

import pytest

from node import liveness
from node.agent import KEEPALIVE_INTERVAL_S
from node.dc_session import SESSION_OPEN_TIMEOUT_S
from node.netwatch import SETTLE_S
from ntm.tunnel import RELAY_FALLBACK_AFTER

from labkit.lab.fed import Federation
from labkit.lab.roam_deadpath import (
    dc_link_loss_failover,
    direct_path_loss_outage,
    idle_move_tells_peer,
    nat_rebind_unreachable,
)

pytestmark = pytest.mark.lab

# The stated bound (docs/PROTOCOL.md §8.3): heartbeat deadline + one unanswered reconnect + the
# registration at the next DC (chain confirmation on anvil: milliseconds; 2 s of headroom for a
# loaded machine).
FAILOVER_BOUND_S = 1.5 * liveness.SESSION_HEARTBEAT_S + SESSION_OPEN_TIMEOUT_S + 2.0
# A third node's new tunnel: the failover, then its Direction Request, the handshake and a ping
# (`ping -W 1` per try), with headroom.
NEW_TUNNEL_BOUND_S = FAILOVER_BOUND_S + 3.0
# The peer's traffic reaches a node whose NAT rebound while idle (issue 22: within 1 s).
REBIND_BOUND_S = 1.0
# A direct path that dies under traffic is replaced by the relay: silent DEAD_AFTER_S, the address
# check (≤ 0.3 s), the Direction Request, the direct candidates tried until the relay fallback
# (RELAY_FALLBACK_AFTER, 1.5 s), with 1 s of headroom (§8.3).
PATH_LOSS_BOUND_S = liveness.DEAD_AFTER_S + 0.3 + RELAY_FALLBACK_AFTER + 1.0
# A move is noticed when rtnetlink's burst settles (the lab's move itself is ~10 `ip` commands),
# well before the 1 s address poll would.
MOVE_NOTICED_BOUND_S = SETTLE_S + 0.45


@pytest.fixture(scope="module")
def fed(lab_shared, tmp_path_factory):
    with Federation(lab_shared, tmp_path_factory.mktemp("deadpath"), n_dcs=2, keepalive_s=KEEPALIVE_INTERVAL_S) as f:
        yield f


def test_home_dc_link_cut_without_rst_fails_over_within_the_bound(fed):
    """Hostile network: the home DC's link is cut (every packet to and from it dropped, no RST,
    TCP connections stay 'open') while X sends a TCP transfer to Y. X notices the silent DC by its
    WebSocket heartbeat, fails over to DC 2 within the bound, a third node Z opens a new tunnel
    to X, and the transfer (end to end, not through the DC) finishes intact."""
    lab = fed.lab
    r = dc_link_loss_failover(
        fed, lab.add_site("dlx", "eim").host, lab.add_site("dly", "eim").host, lab.add_site("dlz", "eim").host
    )
    print(
        f"\nhome DC link cut (no RST): failover {r['failover_s']:.2f} s (bound {FAILOVER_BOUND_S:.1f} s), "
        f"new tunnel from a third node {r['new_tunnel_s']:.2f} s; transfer intact {r['intact']}, "
        f"max stall {r['max_stall_s']:.2f} s; {r}"
    )
    assert r["intact"]
    assert r["failovers"] == 1 and r["x_dc"] == fed.dc_url(1) and r["dc_silences"] >= 2
    assert r["failover_s"] <= FAILOVER_BOUND_S
    assert r["new_tunnel_s"] <= NEW_TUNNEL_BOUND_S


def test_nat_rebinding_while_idle_is_repaired_within_a_second(fed):
    """Hostile network: N's NAT gives N's UDP flows a new public address while the tunnel to P is
    idle (conntrack forgets the old mappings; TCP to the DC survives), so P's packets go to a
    mapping that no longer exists. P's pings get through again within 1 s: P asks for a new
    direction, N (told of the repair) pings P, sees its own address changed and asks for a
    direction from its new mapping; both ends move onto it, directly."""
    lab = fed.lab
    r = nat_rebind_unreachable(fed, lab.add_site("rbn", "eim"), lab.add_site("rbp", "eim"))
    print(
        f"\nNAT rebinding while idle: unreachable {r['unreachable_s']:.3f} s "
        f"({r['lost']} pings lost, {r['replies']}/{r['sent']} answered); {r}"
    )
    assert r["unreachable_s"] <= REBIND_BOUND_S
    assert r["peer_endpoint_after"].startswith(r["new_public"] + ":")  # P now sends to N's new mapping
    assert r["route_after"] == "punched"  # directly, not moved to the relay


def test_a_direct_path_that_dies_under_traffic_moves_to_the_relay_within_the_bound(fed):
    """Hostile network: the direct path between two NATs stops carrying UDP (a firewall starts
    dropping it; the DCs and the relay stay reachable) while P pings N every 20 ms. The tunnel is
    probed, re-directed and carried by the relay: the longest gap in replies stays within the
    bound."""
    lab = fed.lab
    r = direct_path_loss_outage(fed, lab.add_site("pln", "eim"), lab.add_site("plp", "eim"))
    print(f"\ndirect path lost under traffic: outage {r['outage_s']:.3f} s (bound {PATH_LOSS_BOUND_S:.2f} s); {r}")
    assert r["route_before"] == "punched" and r["route_after"] == ("relay", "relay")
    assert r["outage_s"] <= PATH_LOSS_BOUND_S


def test_a_move_while_idle_is_told_to_the_peer_at_once(fed):
    """Roaming: M moves behind another NAT while its tunnel to P is idle. M notices at once
    (rtnetlink, not the 1 s poll) and PINGs P from its new address; P follows M there before it
    sends anything, so P's very first ping afterwards is answered."""
    lab = fed.lab
    r = idle_move_tells_peer(fed, lab.add_site("imm", "eim"), lab.add_site("imt", "eim"), lab.add_public_host("imp"))
    print(
        f"\nidle move: noticed {r['noticed_s']:.3f} s after the move started (its commands took "
        f"{r['move_cmds_s']:.3f} s); {r}"
    )
    assert r["noticed_s"] <= MOVE_NOTICED_BOUND_S
    assert r["peer_endpoint_after"].startswith(r["new_public"] + ":")
    assert r["first_reply_seq"] == 1

"""Make-before-break with two uplinks (issue 22 item 4, lab test (d)): real NATs, DCs, relay and
`ntm up` daemons with TUN; the scenario is labkit/lab/roam_mbb.py's (bench/roam.py reuses it)."""

from __future__ import annotations

import pytest

from labkit.lab.fed import Federation
from labkit.lab.roam_mbb import make_before_break

pytestmark = pytest.mark.lab

KEEPALIVE_S = 2.0
# Packets a handover may lose each way at 100 pkt/s: the aim is 0; one packet in flight on the
# link that went down (or sent in the microseconds before the kernel swapped the route) is the
# headroom a loaded machine gets. Without a standby path it was ~47 (0.48 s).
MAX_LOST = 2


@pytest.fixture(scope="module")
def fed(lab_shared, tmp_path_factory):
    with Federation(lab_shared, tmp_path_factory.mktemp("mbbfed"), n_dcs=2, keepalive_s=KEEPALIVE_S) as f:
        yield f


def test_make_before_break_two_uplinks_behind_eim_nats(fed):
    """Hostile condition: M's first uplink vanishes (link down, no goodbye) while a UDP stream
    runs both ways; every NAT on the way is EIM with a home-router firewall that drops packets from
    any address its host never sent to, so the peer can only hear M's second uplink if a standby
    path was punched before. Both directions must lose (almost) nothing."""
    r = make_before_break(fed)
    print(
        f"\nmake-before-break at {r['rate_pps']:.0f} pkt/s: lost M→P {r['lost_m_to_p']}, "
        f"P→M {r['lost_p_to_m']} (standby ready after {r['standby_ready_s']} s; "
        f"P now sees M at {r['p_sees_m']}, {r['route_after']})"
    )
    assert r["m_stream"]["sent"] == r["p_stream"]["sent"] > 0
    assert r["standby_ready_s"] != float("inf"), "no standby path on the second uplink"
    assert r["p_sees_m"] == r["second_nat"], r  # the tunnel really moved to the second uplink
    assert r["lost_m_to_p"] <= MAX_LOST and r["lost_p_to_m"] <= MAX_LOST, r

"""Outsider-style abuse of a real DC process (issue 11 item 5): a session flooding Direction
Requests gets answers (mostly rate_limited) without the DC's memory growing, and books no relay
paths for what it is refused."""

from __future__ import annotations


from ntm import keys
from labkit.dcnet import metric, raw_http, register
from labkit.load import flood, rss_mb

FLOOD = 2000
#: What the DC may grow by while answering the flood (interpreter noise, caches warming).
RSS_BOUND_MB = 8.0


async def test_a_direction_flood_is_answered_without_growing_the_dc(net):
    attacker, peer = keys.generate(), keys.generate()
    await register(net.urls[0], attacker)
    await register(net.urls[1], peer)
    pid = net.dcs[0].proc.pid
    await flood(net.urls[0], attacker, keys.node_id_of(peer), 50)  # warm up code paths
    before = rss_mb(pid)
    codes = await flood(net.urls[0], attacker, keys.node_id_of(peer), FLOOD)
    grown = rss_mb(pid) - before
    print(f"\nflood of {FLOOD}: {codes}, DC RSS +{grown:.1f} MB")
    assert sum(codes.values()) == FLOOD and codes.get("rate_limited", 0) >= FLOOD - 100
    assert "served" not in codes  # the peer is offline: nothing proceeds, nothing is booked
    assert grown <= RSS_BOUND_MB
    async with raw_http() as http, http.get(net.urls[0] + "/metrics") as r:
        text = await r.text()
    assert metric(text, "ntm_dc_relay_bookings_total") == 0
    limited = metric(text, "ntm_dc_directions_rate_limited_total")
    assert limited >= codes["rate_limited"]

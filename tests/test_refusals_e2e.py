"""Refusals reach the requester at once, and repeated connects do not wait for nothing (issue 22
item 6): real anvil, two DC processes and an RS on loopback, in-process Nodes (the embedding API).

Before: the peer dropped a direction beyond its per-peer rate (or from a peer its allow list does
not admit) silently, so the requester's connect() waited the whole tunnel timeout (8 s) for a
handshake that could not come. Now the peer answers the pushed direction and the DCs carry the
refusal back (docs/PROTOCOL.md §8.1).
"""

from __future__ import annotations

import asyncio
import time

from node.agent import Node, NodeError
from node.tunnels import PEER_DIRECTIONS, TUNNEL_TIMEOUT_S
from ntm import keys
from labkit.dcnet import register

CONNECTS = 40
# Every connect ends well inside the tunnel timeout: loopback answers take milliseconds, this
# leaves headroom for a loaded 2-core machine (a relay fallback would start at 1.5 s).
FAST_S = 3.0
# Why a new path may be refused when asked for over and over: the peer's per-peer rate, or the
# requester's own DC's per-node rate.
RATE_REFUSALS = {"peer_busy", "rate_limited"}


async def test_forty_connects_to_one_peer_never_wait_for_nothing(pair):
    """Adversary: an application hammering connect() at one peer (the bench's signaling loop).
    First with the tunnel left open: every connect reuses it (no Direction Request). Then closing
    the tunnel each time, so each connect asks for a new path: the peer's rate limit refuses some,
    and each of those fails fast with the reason instead of the 8 s handshake timeout."""
    a, b = pair
    assert FAST_S < TUNNEL_TIMEOUT_S / 2
    first = await a.connect(b.id)
    reused = []
    for _ in range(CONNECTS):
        t0 = time.monotonic()
        t = await a.connect(b.id)
        reused.append(time.monotonic() - t0)
        assert t is first
    print(f"\n{CONNECTS} connects reusing the open tunnel: max {max(reused) * 1000:.1f} ms")
    await first.channel.close()

    outcomes: list[str] = []
    times = []
    for _ in range(CONNECTS):
        t0 = time.monotonic()
        try:
            t = await asyncio.wait_for(a.connect(b.id), TUNNEL_TIMEOUT_S + 4)
        except NodeError as exc:
            assert exc.code in RATE_REFUSALS and str(exc), exc
            outcomes.append(exc.code)
        else:
            await t.channel.send(b"x")
            outcomes.append("ok")
            await t.channel.close()
        times.append(time.monotonic() - t0)
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    print(
        f"{CONNECTS} connects, each a new path: {counts}; slowest {max(times):.3f} s, "
        f"median {sorted(times)[len(times) // 2] * 1000:.1f} ms"
    )
    assert max(times) < FAST_S, times
    # the rest of the peer's burst (the first tunnel took one direction) is served
    assert outcomes[0] == "ok" and outcomes.count("ok") >= PEER_DIRECTIONS[1] - 1
    assert "peer_busy" in outcomes  # ... and beyond it the peer said so, at once


async def test_a_peer_whose_allow_list_refuses_us_says_so_at_once(net):
    """Adversary: a node its peer does not admit (the peer's allow list). The peer sits behind a
    "NAT" (it announces an address the DC does not see it at), so the peer initiates and is
    directed first; its refusal comes back through both DCs as a NodeError with the reason, within
    a fraction of the tunnel timeout, and the requester never opened a path (one reply, §8.1)."""
    ka, kb = keys.generate(), keys.generate()
    await register(net.urls[0], ka)
    await register(net.urls[1], kb)
    a = await Node.start(ka, net.urls[0], host="127.0.0.1", port=0)
    b = await Node.start(
        kb, net.urls[1], host="127.0.0.1", port=0, local_addrs=["10.99.0.2:4330"], admit=lambda peer: False
    )
    try:
        t0 = time.monotonic()
        try:
            await a.connect(b.id)
        except NodeError as exc:
            refused, elapsed = exc, time.monotonic() - t0
        else:
            raise AssertionError("the peer's allow list did not refuse")
        print(f"\nrefused in {elapsed * 1000:.1f} ms: {refused.code}: {refused}")
        assert refused.code == "not_allowed" and keys.checksum(b.id) in str(refused) and "allow list" in str(refused)
        assert elapsed < FAST_S and not a.endpoint.sessions  # not listening until the timeout
        assert b.tunnel_table.refused == 1 and not b.tunnels and not a.tunnels
    finally:
        await a.close()
        await b.close()

"""Tunnel liveness when a tunnel is used again after idling (issue 22 item 5: liveness under
loss), on the in-memory network and clock of test_fast_node.py."""

from __future__ import annotations

import asyncio

from node import liveness
from node.liveness import LinkAction
from node.tunnels import LIVENESS_TICK_S
from tests.test_fast_node import pair  # noqa: F401 - the fixture


def test_silence_counts_from_the_later_of_last_heard_and_resumed():
    assert liveness.silent_since(10.0, 12.0) == 12.0 and liveness.silent_since(12.0, 10.0) == 12.0
    assert liveness.in_use(10.0, 9.0) and not liveness.in_use(10.0, 8.9)
    # used again at 20.0 after hearing nothing since 10.0: probed at 20.2, not re-directed
    assert liveness.link_action(20.2, 20.0, liveness.silent_since(10.0, 20.0), False) is LinkAction.PROBE


async def test_a_tunnel_used_again_after_idling_is_probed_before_it_is_redirected(pair):  # noqa: F811
    """Hostile condition: the answers to the first packet after an idle spell are lost (or just
    take longer than one liveness tick). Nothing was heard while idle (keepalives come every
    25 s), so counted from the last packet heard the tunnel looked dead at the first tick after
    the send and was re-directed without a PING (NAT lab, 20% loss: a re-direction per lost
    reply). Counted from the moment it was used again, it gets PINGs first, and a re-direction
    only after DEAD_AFTER_S of unanswered ones."""
    clock, net, dcs, [(ta, _, _), (tb, _, idb)] = pair
    a = await asyncio.wait_for(ta.connect(idb), 2)
    await asyncio.wait_for(tb.accept(), 2)
    clock.advance(5.0)  # idle
    ta._check(a, clock.now())
    net.drop = lambda src, dst, data: True  # from now on nothing gets through
    await a.channel.send(b"after a pause")
    clock.advance(LIVENESS_TICK_S)
    ta._check(a, clock.now())
    assert a.recovering is None and a.probes == 0
    clock.advance(liveness.PROBE_AFTER_S + 0.01)
    ta._check(a, clock.now())
    assert a.recovering is None and a.probes == 1  # silent a little while in use: a PING
    clock.advance(liveness.DEAD_AFTER_S - liveness.PROBE_AFTER_S)
    ta._check(a, clock.now())
    assert a.recovering is not None  # and unanswered: re-directed
    a.recovering.cancel()

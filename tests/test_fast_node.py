"""The node's logic without sockets or a DC: liveness decisions as a table, and the tunnel table
(follow Route Directions, connect/accept, repair by re-direction) on an in-memory network with a
clock the test moves (tests/fakes.py). Real-socket and real-NAT versions: test_tunnel_e2e.py,
tests/lab/."""

from __future__ import annotations

import asyncio
import json
import os
from types import SimpleNamespace

import aiohttp
import pytest

from node import liveness
from node.dc_session import NodeError, direction_signer_ok
from node.endpoint import Endpoint
from node.liveness import LinkAction
from node.tunnels import Tunnels
from ntm import envelope, keys, messages
from tests.fakes import FakeClock, MemoryNetwork

DC_KEY = keys.generate()
DC_ID = keys.node_id_of(DC_KEY)


@pytest.mark.parametrize(
    "now, last_app, last_heard, recovering, want",
    [
        (10.0, 9.9, 9.95, False, LinkAction.NONE),  # in use, heard just now
        (10.0, 9.9, 9.8, False, LinkAction.PROBE),  # in use, silent 0.2 s
        (10.0, 9.9, 9.5, False, LinkAction.REDIRECT),  # in use, silent 0.5 s
        (10.0, 8.5, 1.0, False, LinkAction.NONE),  # idle: keepalives keep it, no probing
        (10.0, 9.9, 1.0, True, LinkAction.NONE),  # already recovering
    ],
)
def test_link_action(now, last_app, last_heard, recovering, want):
    assert liveness.link_action(now, last_app, last_heard, recovering) is want


def test_session_and_failover_decisions():
    assert not liveness.session_dead(100.0, 30.0, 25.0) and liveness.session_dead(100.0, 24.0, 25.0)
    assert [liveness.reconnect_delay(n) for n in (1, 2, 7, 50)] == [0.05, 0.1, 3.2, 3.2]
    assert not liveness.should_fail_over(2) and liveness.should_fail_over(3)
    # a DC that went silent (missed heartbeat, then an unanswered attempt) is left sooner than
    # one that answers with refusals; one silence alone (a blip) is not enough
    assert not liveness.should_fail_over(1, 1) and liveness.should_fail_over(1, 2)
    assert liveness.old_path_expired(20.0, 9.0) and not liveness.old_path_expired(20.0, 11.0)


def test_a_relayed_tunnel_retries_a_direct_path_every_30_s_unless_busy_or_pinned():
    due = liveness.direct_retry_due
    assert due(130.0, 100.0, on_relay=True, busy=False) and not due(129.9, 100.0, on_relay=True, busy=False)
    assert not due(500.0, 100.0, on_relay=False, busy=False)  # direct already (or pinned to the relay)
    assert not due(500.0, 100.0, on_relay=True, busy=True)  # a repair or an attempt is under way
    assert due(100.0, float("-inf"), on_relay=True, busy=False)  # right after a move


def test_a_repair_backs_off_on_refusals_and_stays_fast_after_a_path_loss():
    """Hostile peer: it keeps refusing (peer_busy) every repair of our tunnel for the whole
    repair window. Driven on a FakeClock as the repair loop does, the requests back off (6 in
    60 s, was 200 at one per 0.3 s); a failure that is no refusal (the path or the DC) retries at
    once-ish again, and a refusal after it starts the back-off afresh."""
    from node.tunnels import RECOVERY_GIVE_UP_S

    clock = FakeClock()
    started, refusals, asked = clock.now(), 0, []
    while clock.now() - started < RECOVERY_GIVE_UP_S:
        asked.append(clock.now() - started)
        refusals = liveness.repair_refusals("peer_busy", refusals)
        clock.advance(liveness.repair_retry_delay(refusals))
    assert asked == [0.0, 2.0, 6.0, 14.0, 30.0, 46.0]
    assert liveness.repair_refusals("timeout", refusals) == 0  # a path loss: fast again
    assert liveness.repair_retry_delay(liveness.repair_refusals("dc_lost", 3)) == liveness.REPAIR_RETRY_S <= 0.3
    assert liveness.repair_retry_delay(liveness.repair_refusals("rate_limited", 0)) == 2.0
    assert liveness.repair_retry_delay(liveness.repair_refusals("not_allowed", 0)) == 2.0


class FakeDcs:
    """Plays the DCs for two tunnel tables: a Direction Request becomes one signed Route Direction
    for each end, with each other's in-memory address as the candidate: the peer's pushed first
    (it waits, or it initiates), the requester's as the one reply; the peer's refusal fails the
    request as the DCs do, and the requester then gets no direction."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.ends: dict[bytes, tuple[Tunnels, tuple[str, int], bytes]] = {}
        self.forge_peer_key = False
        self.peer_initiates = False  # its Tunnel Requests may come before the requester has its reply
        self.requests = 0
        self.pushed: dict[bytes, list[dict]] = {}  # directions given to each node

    def direction(self, me: bytes, peer: bytes, path: bytes, role: str, requester: bytes, resume: bytes | None) -> dict:
        _, peer_addr, peer_pub = self.ends[peer]
        if self.forge_peer_key:
            peer_pub = keys.public_bytes(keys.generate())
        body = messages.RouteDirection(
            path.hex(),
            "direct",
            "test",
            role,
            keys.checksum(me),
            keys.checksum(DC_ID),  # type: ignore[arg-type]
            keys.checksum(peer),
            peer_pub.hex(),
            keys.checksum(requester),
            [f"{peer_addr[0]}:{peer_addr[1]}"],
            resume=resume.hex() if resume else None,
        )
        sealed = envelope.seal(DC_KEY, messages.ROUTE_DIRECTION, messages.encode(body), self.clock.wall_ms())
        self.pushed.setdefault(me, []).append(sealed)
        return sealed

    @staticmethod
    async def trust(signer: bytes, home_dc: bytes, ours: bool) -> bool:
        return direction_signer_ok(signer, home_dc, ours, DC_ID, {DC_ID})

    def asker(self, me: bytes):
        async def ask(peer: bytes, route: str | None, resume: bytes | None) -> bytes:
            self.requests += 1
            path = os.urandom(8)
            theirs, mine = ("initiate", "wait") if self.peer_initiates else ("wait", "initiate")
            ack = await self.ends[peer][0].on_direction(self.direction(peer, me, path, theirs, me, resume))
            assert ack is not None and ack.path == path.hex()
            if ack.refused is not None:
                raise NodeError(ack.refused, "the peer refused")
            if self.peer_initiates:
                await asyncio.sleep(0.05)  # the peer's first Tunnel Request is there before our reply
            return envelope.signed(self.direction(me, peer, path, mine, me, resume))

        return ask


@pytest.fixture
async def pair():
    clock, net = FakeClock(), MemoryNetwork()
    dcs = FakeDcs(clock)
    made = []
    for ip in ("198.18.1.2", "198.18.2.2"):
        key = keys.generate()
        ep = await Endpoint.create(key, ip, 0, clock=clock, binder=net.binder(ip))
        nid = keys.node_id_of(key)

        async def no_move() -> bool:
            return False

        t = Tunnels(nid, ep, clock, dcs.asker(nid), no_move, trust_dc=dcs.trust)
        dcs.ends[nid] = (t, ep.local_addr, keys.public_bytes(key))
        made.append((t, ep, nid))
    try:
        yield clock, net, dcs, made
    finally:
        for t, ep, _ in made:
            await t.close()
            await ep.close()


async def test_connect_accept_and_exchange(pair):
    clock, net, dcs, [(ta, _, ida), (tb, _, idb)] = pair
    a = await asyncio.wait_for(ta.connect(idb), 2)
    b = await asyncio.wait_for(tb.accept(), 2)
    assert (a.peer, b.peer, a.id) == (idb, ida, b.id)
    await a.channel.send(b"ping")
    assert await asyncio.wait_for(b.channel.recv(), 1) == b"ping"
    await b.channel.send(b"pong")
    assert await asyncio.wait_for(a.channel.recv(), 1) == b"pong"


async def test_a_lying_dc_cannot_hand_over_another_key(pair):
    clock, net, dcs, [(ta, _, _), (_, _, idb)] = pair
    dcs.forge_peer_key = True
    with pytest.raises(NodeError) as exc:
        await asyncio.wait_for(ta.connect(idb), 2)
    assert exc.value.code == "tunnel_failed" and not ta.table


async def test_a_direction_not_signed_by_its_dc_is_ignored(pair):
    clock, net, dcs, [(ta, _, ida), (_, _, idb)] = pair
    obj = dcs.direction(ida, idb, os.urandom(8), "initiate", idb, None)
    obj["body"]["role"] = "wait"  # tampered after signing
    assert await ta.on_direction(obj) is None  # not even answered
    await asyncio.sleep(0.05)
    assert not ta.table and not net.sent and not ta.endpoint.sessions


def test_who_may_direct_a_node():
    """§8.1: the deliverer is our session's DC; our own requests are answered by it; a peer's by
    any active DC; a stranger's key, or a direction another DC claims to deliver, never."""
    ours_dc, other_dc, stranger = b"\x0d" * 20, b"\x0e" * 20, b"\x0f" * 20
    active = {ours_dc, other_dc}
    assert direction_signer_ok(ours_dc, ours_dc, True, ours_dc, active)
    assert not direction_signer_ok(other_dc, ours_dc, True, ours_dc, active)  # our request: our DC signs
    assert direction_signer_ok(other_dc, ours_dc, False, ours_dc, active)  # the requester's DC
    assert not direction_signer_ok(stranger, ours_dc, False, ours_dc, active)
    assert not direction_signer_ok(ours_dc, other_dc, False, ours_dc, active)  # not delivered by our DC
    assert not direction_signer_ok(ours_dc, ours_dc, False, None, active)  # no session yet


async def test_injected_directions_send_nothing(pair):
    """On-path attacker on the node↔DC session: it injects Route Directions aiming the node's
    Tunnel Requests at an address of its choice: signed by a stranger key, by a key that is no
    DC but names this node and its DC correctly, one claiming to answer a request the node never
    made, and a genuine one replayed. Each is ignored before anything is sent; the genuine
    tunnel is unharmed."""
    clock, net, dcs, [(ta, _, ida), (tb, _, idb)] = pair
    a = await asyncio.wait_for(ta.connect(idb), 2)
    b = await asyncio.wait_for(tb.accept(), 2)
    sent = len(net.sent)
    body = messages.encode(
        messages.RouteDirection(
            os.urandom(8).hex(),
            "direct",
            "lure",
            "initiate",
            keys.checksum(ida),
            keys.checksum(DC_ID),  # type: ignore[arg-type]
            keys.checksum(idb),
            dcs.ends[idb][2].hex(),
            keys.checksum(idb),
            ["203.0.113.7:4330"],
        )
    )
    for signer in (keys.generate(), keys.generate()):
        assert await ta.on_direction(envelope.seal(signer, messages.ROUTE_DIRECTION, body, clock.wall_ms())) is None
    assert (
        await ta.on_direction(
            envelope.seal(DC_KEY, messages.ROUTE_DIRECTION, {**body, "requester": keys.checksum(ida)}, clock.wall_ms())
        )
        is None
    )  # "ours", but A asked for nothing
    assert await ta.on_direction(dcs.pushed[ida][-1]) is None  # the genuine direction of the connect, replayed
    assert ta.forged_directions == 4 and len(net.sent) == sent
    assert ta.table.keys() == {a.id}
    await a.channel.send(b"still ours")
    assert await asyncio.wait_for(b.channel.recv(), 1) == b"still ours"


async def test_a_dead_path_is_repaired_by_redirection_on_both_ends(pair):
    clock, net, dcs, [(ta, _, _), (tb, _, idb)] = pair
    a = await asyncio.wait_for(ta.connect(idb), 2)
    b = await asyncio.wait_for(tb.accept(), 2)
    old = a.channel.path_id
    net.drop = lambda src, dst, data: data[1:9] == old  # the old path goes dark both ways
    await a.channel.send(b"lost")  # in use ...
    clock.advance(liveness.DEAD_AFTER_S + 0.01)  # ... and silent past the dead-path time
    ta._check(a, clock.now())
    assert a.recovering is not None
    await asyncio.wait_for(a.recovering, 2)
    assert a.redirects == b.redirects == 1 and a.channel.path_id == b.channel.path_id != old
    assert ta.table.keys() == {a.id} and dcs.requests == 2  # the same tunnel, moved: no new one
    await a.channel.send(b"after the move")
    assert await asyncio.wait_for(b.channel.recv(), 1) == b"after the move"


async def test_a_node_whose_nat_rebound_redirects_from_its_new_mapping(pair):
    """Hostile network: B's NAT rebinds while the tunnel is idle (new public mapping), so the
    direction A asks for names B's old mapping and would never connect. B, told of the repair,
    pings A at once, sees its own address changed and asks for its own direction instead of
    following A's: both ends move onto B's path."""
    clock, net, dcs, [(ta, _, _), (tb, _, idb)] = pair
    a = await asyncio.wait_for(ta.connect(idb), 2)
    b = await asyncio.wait_for(tb.accept(), 2)
    old = a.channel.path_id

    async def rebound() -> bool:
        return True

    tb.check_address = rebound
    net.drop = lambda src, dst, data: data[1:9] == old
    await a.channel.send(b"lost")
    clock.advance(liveness.DEAD_AFTER_S + 0.01)
    ta._check(a, clock.now())
    for _ in range(200):
        if a.redirects and b.redirects:
            break
        await asyncio.sleep(0.01)
    assert b.probes == 1  # pinged A at once from where it is
    assert a.channel.path_id == b.channel.path_id != old and a.redirects == b.redirects == 1
    assert dcs.requests == 3  # connect, A's repair (not followed by B), B's own
    await a.channel.send(b"after the rebind")
    assert await asyncio.wait_for(b.channel.recv(), 1) == b"after the rebind"


def test_a_node_serves_a_bounded_number_of_directions_per_peer_and_in_all():
    """Reflection bound (issue 11 item 1): directions a peer asked for are served up to a burst
    per peer and in all, then refused before any handshake; refusals are counted."""
    from node.tunnels import DIRECTIONS_CAP, PEER_DIRECTIONS, Tunnels

    clock = FakeClock()
    t = Tunnels(b"\x01" * 20, None, clock, None, None)  # type: ignore[arg-type]
    peer = b"\x02" * 20
    burst = int(PEER_DIRECTIONS[1])
    assert [t._refusal(peer) for _ in range(burst + 1)] == [None] * burst + ["peer_busy"]
    clock.advance(1 / PEER_DIRECTIONS[0])
    assert t._refusal(peer) is None and t._refusal(peer) == "peer_busy"
    others = [t._refusal(i.to_bytes(2, "big") + b"\0" * 18) for i in range(3 * 256, 3 * 256 + int(DIRECTIONS_CAP[1]))]
    assert others[0] is None and others[-1] == "peer_busy"  # the node-wide ceiling ran out
    assert t.refused == 2 + len(others) - others.count(None)
    t.admit = lambda p: p != peer
    assert t._refusal(peer) == "not_allowed"  # the allow list first: no token taken


async def test_a_peer_that_does_not_admit_us_refuses_at_once_with_its_reason(pair):
    """Adversary: a requester the peer's allow list does not admit. The peer answers the pushed
    direction with not_allowed before any handshake; connect() raises it at once (no tunnel
    timeout), and the refused peer sent nothing on the network."""
    clock, net, dcs, [(ta, _, _), (tb, _, idb)] = pair
    tb.admit = lambda peer: False
    with pytest.raises(NodeError) as exc:
        await asyncio.wait_for(ta.connect(idb), 0.5)
    assert exc.value.code == "not_allowed" and tb.refused == 1
    assert not ta.table and not tb.table and not net.sent


async def test_a_peer_that_initiates_and_refuses_leaves_us_nothing_half_opened(pair):
    """The peer initiates (we wait) and refuses: the DC asked it before answering us, so connect()
    fails at once with its reason and we never opened a path to listen on (or bind at the relay)."""
    clock, net, dcs, [(ta, ea, _), (tb, _, idb)] = pair
    dcs.peer_initiates = True
    tb.admit = lambda peer: False
    with pytest.raises(NodeError) as exc:
        await asyncio.wait_for(ta.connect(idb), 0.5)
    assert exc.value.code == "not_allowed"
    await asyncio.sleep(0.05)
    assert not ea.sessions and not ta.table and not net.sent


async def test_a_tunnel_request_that_arrives_before_our_reply_is_answered_at_once(pair):
    """One reply (§8.1): the peer initiates as soon as it is directed, so its first Tunnel Request
    reaches us before the DC's reply does. The endpoint keeps it and answers it when the path
    opens: the tunnel is up without waiting for the peer's 250 ms retransmission. A stranger's
    Requests for random paths fill the bounded store, pushing out the oldest, and are never answered."""
    from node import endpoint

    clock, net, dcs, [(ta, ea, _), (tb, _, idb)] = pair
    dcs.peer_initiates = True
    a = await asyncio.wait_for(ta.connect(idb), 2)
    assert ea.stats["early_requests"] == 1 and a.channel.established
    b = await asyncio.wait_for(tb.accept(), 1)
    requests_from_b = [d for src, dst, d in net.sent if dst == ea.local_addr and d[0] == 0x01]
    assert len(requests_from_b) == 1 and b.channel.established  # answered: no retransmission needed
    sent = len(net.sent)
    for i in range(endpoint.EARLY_REQUESTS_MAX + 10):
        ea._on_datagram(b"\x01" + i.to_bytes(8, "big") + b"junk" * 20, ("203.0.113.9", 4330))
    assert len(ea._early) == endpoint.EARLY_REQUESTS_MAX and (10).to_bytes(8, "big") in ea._early
    assert len(net.sent) == sent  # nothing answered, nothing decrypted


async def test_connect_reuses_a_working_tunnel_and_keeps_relay_pinning(pair):
    """Repeated connect() to one peer: the working tunnel comes back (no new Direction Request,
    nothing for the peer's rate limit); a relay-pinned request gets only a relay-pinned tunnel;
    fresh=True and a closed tunnel make new ones."""
    clock, net, dcs, [(ta, _, _), (tb, _, idb)] = pair
    first = await asyncio.wait_for(ta.connect(idb), 2)
    assert [await ta.connect(idb) for _ in range(40)] == [first] * 40 and dcs.requests == 1
    pinned = await asyncio.wait_for(ta.connect(idb, force_relay=True), 2)
    assert pinned is not first and pinned.pinned_relay and dcs.requests == 2
    assert await ta.connect(idb, force_relay=True) is pinned and await ta.connect(idb) is first
    again = await asyncio.wait_for(ta.connect(idb, fresh=True), 2)
    assert again not in (first, pinned) and dcs.requests == 3
    await again.channel.close()
    await first.channel.close()
    after = await asyncio.wait_for(ta.connect(idb), 2)
    assert after not in (first, again) and dcs.requests == 4


async def test_a_refused_repair_waits_before_asking_again(pair):
    """Hostile peer: its direction rate for us is used up, so it refuses our repair (peer_busy).
    The repair does not ask again 0.3 s later, as after a path loss, but waits (back-off): one
    Direction Request in the first 0.7 s of the repair."""
    clock, net, dcs, [(ta, _, ida), (tb, _, idb)] = pair
    a = await asyncio.wait_for(ta.connect(idb), 2)
    await asyncio.wait_for(tb.accept(), 2)
    while tb._refusal(ida) is None:  # B's per-peer bucket for A runs dry
        pass
    net.drop = lambda src, dst, data: data[1:9] == a.channel.path_id
    await a.channel.send(b"lost")
    clock.advance(liveness.DEAD_AFTER_S + 0.01)
    ta._check(a, clock.now())
    assert a.recovering is not None
    await asyncio.sleep(0.7)
    assert dcs.requests == 2 and not a.recovering.done()  # connect, one refused repair; still waiting
    a.recovering.cancel()


class ScriptedSession:
    """The node's side of a DC session whose DC answers each frame with `answer(frame)` (None: the
    session drops instead)."""

    def __init__(self, answer) -> None:
        self.answer, self.sent, self.inbox = answer, [], asyncio.Queue()

    async def send_json(self, obj: dict) -> None:
        self.sent.append(obj)
        got = self.answer(obj)
        self.inbox.put_nowait(got and SimpleNamespace(type=aiohttp.WSMsgType.TEXT, data=json.dumps(got)))

    def __aiter__(self):
        return self

    async def __anext__(self):
        msg = await self.inbox.get()
        if msg is None:
            raise StopAsyncIteration
        return msg


@pytest.mark.parametrize(
    "dc, code", [("new", None), ("old", "malformed"), ("no_direction", "refused"), ("drops", "dc_lost")]
)
async def test_a_direction_request_is_answered_by_one_reply_or_fails_at_once(dc, code):
    """One reply per Direction Request (§8.1): the node asks `inline` and returns the direction
    in the result. Mixed versions: a DC older than that refuses the unknown field with a session
    error that names no request: the waiting request fails at once (malformed), not after the 8 s
    timeout; a result without a direction is a refusal, never an empty success; a session that
    drops between request and reply fails it at once (dc_lost: the caller's repair asks again)."""
    from node.dc_session import DcSession

    direction = envelope.signed(envelope.seal(DC_KEY, messages.ROUTE_DIRECTION, {"path": "ab" * 8}, 1))

    def answer(req: dict) -> dict | None:
        if dc == "drops":
            return None
        if dc == "old":
            return {"type": "error", "error": "malformed", "message": "Object contains unknown field `inline`"}
        route = messages.RouteChoice("ab" * 8, "direct", "test", "initiate")
        got = direction if dc == "new" else None
        return messages.encode(messages.DirectionResult(req["id"], route=route, direction=got))

    session = DcSession(keys.generate(), "http://dc.test:8330", None, FakeClock(), 25.0, [], None, lambda: None)
    session.ws = ws = ScriptedSession(answer)
    session._session_up.set()
    reader = asyncio.create_task(session._read_session(ws))
    try:
        if dc == "new":
            assert await asyncio.wait_for(session.direction(b"\x02" * 20), 1) == direction
        else:
            with pytest.raises(NodeError) as exc:
                await asyncio.wait_for(session.direction(b"\x02" * 20), 1)
            assert exc.value.code == code
        assert [m["inline"] for m in ws.sent] == [True] and not session._results
    finally:
        reader.cancel()

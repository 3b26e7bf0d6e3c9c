"""The DC's logic without a chain, sockets or HTTP: two Coordinators on a FakeChain, federation
requests routed in-process, node sessions as lists of pushed messages (tests/fakes.py). The same
behaviour is tested against real processes and anvil in test_dc.py and test_tunnel_e2e.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from dc.coordinator import Coordinator
from dc.errors import DirectionError, NodeLookupError
from dc.federation import FederationClient, FederationError
from dc.server import error_for
from ntm import envelope, keepalive, keys, messages
from ntm.registration import RegistrationError, RegistrationRequest
from tests.fakes import FakeChain, FakeClock, FederationRouter, fake_dc

RS_URL = "http://rs.test:8340"
RS_ENDPOINT = "198.18.0.100:4340"


@dataclass
class Fed:
    clock: FakeClock
    chain: FakeChain
    router: FederationRouter
    dcs: list[Coordinator]
    tasks: list[asyncio.Task] = field(default_factory=list)


@pytest.fixture
async def fed(tmp_path):
    clock = FakeClock()
    chain = FakeChain(clock=clock)
    router = FederationRouter(error_for)
    dc_keys = [keys.generate() for _ in range(2)]
    for i, k in enumerate(dc_keys):
        chain.admit(keys.node_id_of(k), f"dc{i + 1}", f"http://dc{i + 1}.test:8330")
    f = Fed(clock, chain, router, [])
    for i, k in enumerate(dc_keys):
        c = fake_dc(chain, k, tmp_path, f"dc{i + 1}", [RS_URL], router.post)
        cache = c.cache
        await cache.load()
        url = f"http://dc{i + 1}.test:8330"

        async def ntm_info(body: dict, c: Coordinator = c) -> dict:
            return c.answer_ntm_info(body)

        router.route(url + "/v1/federation/ntm-info", ntm_info)
        router.route(url + "/v1/federation/route-direction", c.signaling.accept_delivery)
        router.route(url + "/v1/federation/direction-offer", c.signaling.accept_offer)
        f.tasks += [asyncio.create_task(cache.run()), asyncio.create_task(c.submitter.run())]
        f.dcs.append(c)

    async def relay(body: dict) -> dict:  # an RS that trusts the chain's active DCs
        env = envelope.open_envelope(
            body, messages.RELAY_DIRECTION, clock.wall_ms(), lambda a: a in chain.dcs and chain.dcs[a].active
        )
        d = messages.decode(messages.RelayDirection, env.body)
        return messages.encode(messages.RelayBooking(d.path, [RS_ENDPOINT], True, d.expires_ms, d.max_bytes))

    router.route(RS_URL + "/v1/relay-directions", relay)
    try:
        yield f
    finally:
        for t in f.tasks:
            t.cancel()
        await asyncio.gather(*f.tasks, return_exceptions=True)
        for c in f.dcs:
            c.store.close()


@dataclass
class FakeNode:
    key: object
    id: bytes
    pushed: list[dict] = field(default_factory=list)
    signaling: Any = None  # its home DC's, once online: pushed directions are acknowledged there
    refuse: str | None = None  # the refusal it answers every direction with (None: it follows)
    silent: bool = False  # answers no direction (a dead session the DC has not noticed)

    async def send(self, msg: dict) -> None:
        self.pushed.append(msg)
        if msg.get("type") == "direction" and self.signaling is not None and not self.silent:
            self.signaling.on_ack(self.id, messages.DirectionAck(msg["direction"]["body"]["path"], self.refuse))

    def directions(self) -> list[messages.RouteDirection]:
        return [
            messages.decode(messages.RouteDirection, m["direction"]["body"])
            for m in self.pushed
            if m.get("type") == "direction"
        ]


async def register(
    fed: Fed, dc: Coordinator, local: str = "10.0.0.2:4330", revoked: bool = False, node: FakeNode | None = None
) -> FakeNode:
    n = node or FakeNode(*(lambda k: (k, keys.node_id_of(k)))(keys.generate()))
    fed.clock.advance(0.01)
    req = RegistrationRequest.signed(n.key, dc.info(), fed.clock.wall_ms(), (local,), revoked)
    res = await dc.register(req, wait_confirmed=True)
    assert res.status == "confirmed", res
    for other in fed.dcs:  # every DC's cache follows the chain's events (polled)
        assert await other.cache.wait_for(
            lambda: (r := other.cache.nodes.get(n.id)) is not None and r.timestamp >= res.timestamp, 2
        )
    return n


def go_online(
    dc: Coordinator, n: FakeNode, local: str, observed: tuple[str, int], observed_alt: tuple[str, int] | None = None
) -> None:
    """A session (pushes land in n.pushed) and keepalives from `observed` (and `observed_alt`)."""
    s = dc.presence.open(n.id, n.send, (local,))
    n.signaling = dc.signaling
    assert dc.presence.on_keepalive(keepalive.encode_request(n.id, 1, s.token), observed) is not None
    dc.presence.on_keepalive(keepalive.encode_request(n.id, 2, s.token), observed_alt or observed, alt=True)


async def test_registration_confirms_and_every_dc_learns_the_home(fed):
    a = await register(fed, fed.dcs[0])
    assert fed.chain.nodes[a.id].dc == fed.dcs[0].address
    info, home = await fed.dcs[1].lookup(a.id)  # through the other DC: NTM Information Request
    assert home == fed.dcs[0].address and info.pubkey == keys.public_bytes(a.key).hex() and info.confirmed
    assert fed.router.calls == ["http://dc1.test:8330/v1/federation/ntm-info"]


async def test_stale_and_revoked_records_are_refused_before_the_chain(fed):
    a = await register(fed, fed.dcs[0])
    stale = RegistrationRequest.signed(a.key, fed.dcs[0].info(), fed.chain.nodes[a.id].timestamp, ())
    with pytest.raises(RegistrationError, match="not newer"):
        await fed.dcs[0].register(stale, wait_confirmed=False)
    await register(fed, fed.dcs[0], revoked=True, node=a)
    with pytest.raises(RegistrationError) as exc:
        await register(fed, fed.dcs[1], node=a)
    assert exc.value.code == "revoked"


async def test_cross_dc_direction_between_two_nats_is_a_punch(fed):
    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    result, _ = await fed.dcs[0].signaling.request(a.id, b.id)
    assert (result.kind, result.role) == ("punch", "punch")
    [da], [db] = a.directions(), b.directions()  # B's went through its home DC (dc2)
    assert da.path == db.path == result.path
    assert (da.peer, db.peer) == (keys.checksum(b.id), keys.checksum(a.id))
    assert da.peer_pubkey == keys.public_bytes(b.key).hex() and db.peer_pubkey == keys.public_bytes(a.key).hex()
    assert da.candidates[0] == "198.18.2.1:50001" and db.candidates[0] == "198.18.1.1:50000"
    assert (da.relay.side, db.relay.side) == (0, 1) and da.relay.token != db.relay.token  # per-side keys
    assert da.relay.endpoints == [RS_ENDPOINT]


async def test_a_cross_dc_direction_is_one_federation_call_and_the_peer_initiating_two(fed):
    """Issue 30 item 1 (§8.5): the requester's DC makes one call (a Direction Offer); the peer's
    home DC books the relay and signs its node's direction. When the peer initiates, the
    requester is directed first and the peer's direction follows in a second call."""
    dc1, dc2 = "http://dc1.test:8330", "http://dc2.test:8330"
    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    calls = len(fed.router.calls)
    result, _ = await fed.dcs[0].signaling.request(a.id, b.id)
    assert fed.router.calls[calls:] == [dc2 + "/v1/federation/direction-offer", RS_URL + "/v1/relay-directions"]
    signers = [
        envelope.open_envelope(
            n.pushed[-1]["direction"], messages.ROUTE_DIRECTION, fed.clock.wall_ms(), lambda dc: True
        ).sender
        for n in (a, b)
    ]
    assert signers == [fed.dcs[0].address, fed.dcs[1].address] and result.kind == "punch"
    p = await register(fed, fed.dcs[0])  # public: its observed address is its own
    go_online(fed.dcs[0], p, "198.18.9.9:4330", ("198.18.9.9", 4330))
    b_send, seen_first = b.send, []

    async def send(msg: dict) -> None:
        seen_first.append(len(p.directions()))  # what the requester had when the peer was directed
        await b_send(msg)

    fed.dcs[1].presence.sessions[b.id].send = send
    calls = len(fed.router.calls)
    result, _ = await fed.dcs[0].signaling.request(p.id, b.id)
    assert (result.kind, result.role) == ("nat_initiates", "wait") and seen_first == [1]
    assert fed.router.calls[calls:] == [
        dc2 + "/v1/federation/direction-offer",
        RS_URL + "/v1/relay-directions",
        dc2 + "/v1/federation/route-direction",
    ]
    assert dc1 not in "".join(fed.router.calls)


async def test_a_forged_or_misaddressed_direction_offer_directs_nobody(fed):
    """A hostile DC-to-DC request (§8.5): an offer signed by a stranger, one naming another DC's
    node as the requester, one whose requester key is not the node's, one addressed to another
    DC: each is refused before any relay booking or push."""
    import msgspec

    from ntm.errors import SignatureError

    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    me = fed.dcs[0].local_info(a.id)
    dc2 = keys.checksum(fed.dcs[1].address)
    good = messages.DirectionOffer("11" * 8, dc2, keys.checksum(b.id), me)
    stranger = FederationClient(keys.generate(), lambda dc: True, envelope.ReplayGuard(), fed.clock)
    c = await register(fed, fed.dcs[1])
    cases = [
        (stranger, good, SignatureError, None),
        (
            fed.dcs[0].federation,
            msgspec.structs.replace(good, requester=fed.dcs[1].local_info(c.id)),
            DirectionError,
            "not_home",
        ),
        (
            fed.dcs[0].federation,
            msgspec.structs.replace(good, requester=msgspec.structs.replace(me, pubkey=keys.public_bytes(c.key).hex())),
            DirectionError,
            "bad_pubkey",
        ),
        (
            fed.dcs[0].federation,
            msgspec.structs.replace(good, to=keys.checksum(fed.dcs[0].address)),
            NodeLookupError,
            "wrong_dc",
        ),
    ]
    for client, offer, error, code in cases:
        with pytest.raises(error) as exc:
            await fed.dcs[1].signaling.accept_offer(client.seal(messages.DIRECTION_OFFER, offer))
        assert code is None or exc.value.code == code
    assert b.directions() == [] and fed.dcs[1].signaling.counters["relay_bookings"] == 0
    answer = await fed.dcs[1].signaling.accept_offer(fed.dcs[0].federation.seal(messages.DIRECTION_OFFER, good))
    assert len(b.directions()) == 1 and answer["body"]["path"] == "11" * 8  # the genuine one goes through


async def test_symmetric_nat_gets_the_relay_and_no_candidates(fed):
    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001), observed_alt=("198.18.2.1", 50999))
    result, _ = await fed.dcs[0].signaling.request(a.id, b.id)
    assert result.kind == "relay"
    assert a.directions()[0].candidates == [] and b.directions()[0].candidates == []


async def test_a_direct_only_request_books_no_relay_and_is_refused_when_only_the_relay_works(fed):
    """route "direct" (a relayed tunnel trying to move off the relay, §8.3): a direct path with
    no relay grant, or a refusal that costs no relay booking and pushes nothing to the peer."""
    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    calls = len(fed.router.calls)
    result, _ = await fed.dcs[0].signaling.request(a.id, b.id, direct_only=True, resume=b"\x01" * 8)
    assert result.kind == "punch"
    assert a.directions()[0].relay is None and b.directions()[0].relay is None
    assert a.directions()[0].resume == "01" * 8
    assert not any("relay-directions" in c for c in fed.router.calls[calls:])
    c = await register(fed, fed.dcs[1])
    go_online(fed.dcs[1], c, "10.3.0.2:4330", ("198.18.3.1", 50002), observed_alt=("198.18.3.1", 50999))
    calls = len(fed.router.calls)
    with pytest.raises(DirectionError) as exc:
        await fed.dcs[0].signaling.request(a.id, c.id, direct_only=True)
    assert exc.value.code == "no_direct" and c.directions() == []
    assert not any("relay-directions" in c for c in fed.router.calls[calls:])


async def test_announced_addresses_reach_the_peer_only_as_one_unverified_candidate(fed):
    """Reflection (issue 11 item 1): a node announcing seven third-party addresses; its peer's
    direction carries the observed mapping as the candidate and at most one other address."""
    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    lies = tuple(f"203.0.113.{i}:53" for i in range(1, 8))
    s = fed.dcs[0].presence.open(a.id, a.send, lies)
    fed.dcs[0].presence.on_keepalive(keepalive.encode_request(a.id, 1, s.token), ("198.18.1.1", 50000))
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    await fed.dcs[0].signaling.request(a.id, b.id)
    [db] = b.directions()
    assert db.candidates == ["198.18.1.1:50000"] and len(db.unverified) <= 1
    assert set(db.unverified) <= set(lies)


async def test_a_direction_flood_is_rate_limited_and_books_no_relay_for_refusals(fed):
    """Issue 11 item 5: 200 Direction Requests from one session to an offline peer: a burst is
    answered (offline), the rest refused rate_limited before any lookup; no relay path is booked
    for a direction that does not proceed."""
    from dc.signaling import DIRECTIONS_PER_NODE

    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    codes = []
    for _ in range(200):
        try:
            await fed.dcs[0].signaling.request(a.id, b.id)
        except DirectionError as exc:
            codes.append(exc.code)
    burst = int(DIRECTIONS_PER_NODE[1])
    assert codes == ["offline"] * burst + ["rate_limited"] * (200 - burst)
    sig = fed.dcs[0].signaling
    assert bookings(fed) == 0 and sig.counters["directions_rate_limited"] == 200 - burst
    fed.clock.advance(1.0)  # the bucket refills: the node is served again
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    await sig.request(a.id, b.id)
    assert bookings(fed) == 1  # by the peer's home DC, which directs its end (§8.5)


def bookings(fed: Fed) -> int:
    """Relay paths booked by all the federation's DCs."""
    return sum(c.signaling.counters["relay_bookings"] for c in fed.dcs)


async def test_registrations_are_limited_per_source_and_by_the_gas_budget(fed):
    from dc.coordinator import REGISTRATIONS_PER_SOURCE
    from ntm.ratelimit import TokenBucket

    dc = fed.dcs[0]
    dc.new_node_budget = TokenBucket(0.0, 3)  # three new nodes, no refill
    keys_ = [keys.generate() for _ in range(4)]
    for k in keys_[:3]:
        fed.clock.advance(0.01)
        await dc.register(RegistrationRequest.signed(k, dc.info(), fed.clock.wall_ms(), ()), False)
    fed.clock.advance(0.01)
    with pytest.raises(RegistrationError) as exc:
        await dc.register(RegistrationRequest.signed(keys_[3], dc.info(), fed.clock.wall_ms(), ()), False)
    assert exc.value.code == "over_budget"
    fed.clock.advance(0.01)  # a known node's update is not a new identity: not limited by the budget
    await dc.register(RegistrationRequest.signed(keys_[0], dc.info(), fed.clock.wall_ms(), ()), False)

    dc.new_node_budget = TokenBucket(0.0, 1000)
    burst = int(REGISTRATIONS_PER_SOURCE[1])

    async def codes(source: str, known: list | None, n: int) -> list[str]:
        """n registrations from `source`: updates of `known` nodes, or fresh identities."""
        out = []
        for i in range(n):
            fed.clock.advance(0.01)
            key = known[i % len(known)] if known else keys.generate()
            try:
                await dc.register(
                    RegistrationRequest.signed(key, dc.info(), fed.clock.wall_ms(), ()), False, source=source
                )
                out.append("ok")
            except RegistrationError as exc:
                out.append(exc.code)
        return out

    # any registration: a burst per source address, then its rate
    assert await codes("203.0.113.9", keys_[:3], burst + 5) == ["ok"] * burst + ["rate_limited"] * 5
    # new identities: 1, 2, 4, 8 tokens of the source network's 16 (another address of it shares them)
    assert (
        await codes("198.51.100.1", None, 3) + await codes("198.51.100.2", None, 3) == ["ok"] * 4 + ["rate_limited"] * 2
    )
    assert await codes("192.0.2.1", None, 1) == ["ok"]  # another network is not affected


@pytest.mark.parametrize("case", ["self", "unknown_node", "offline", "revoked"])
async def test_direction_refusals(fed, case):
    a = await register(fed, fed.dcs[0])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    peer = {"self": lambda: a.id, "unknown_node": lambda: keys.node_id_of(keys.generate())}.get(case)
    if peer is None:
        b = await register(fed, fed.dcs[1])
        if case == "revoked":
            await register(fed, fed.dcs[1], revoked=True, node=b)
        peer = lambda: b.id  # noqa: E731
    with pytest.raises(DirectionError) as exc:
        await fed.dcs[0].signaling.request(a.id, peer())
    assert exc.value.code == case
    assert a.directions() == []


async def test_federation_refuses_strangers_and_replays(fed):
    b = await register(fed, fed.dcs[1])
    home = fed.dcs[1].address
    stranger = FederationClient(
        keys.generate(), lambda _a: True, envelope.ReplayGuard(), fed.clock, transport=fed.router.post
    )
    with pytest.raises(FederationError, match="not an active DC") as exc:
        await stranger.ntm_info("http://dc2.test:8330", home, b.id)
    assert exc.value.status == 403
    req = fed.dcs[0].federation.seal(
        messages.INFO_REQUEST, messages.InfoRequest(keys.checksum(b.id), keys.checksum(home))
    )
    assert fed.dcs[1].answer_ntm_info(req)
    with pytest.raises(Exception, match="replayed"):
        fed.dcs[1].answer_ntm_info(req)
    wrong = fed.dcs[0].federation.seal(
        messages.INFO_REQUEST, messages.InfoRequest(keys.checksum(b.id), keys.checksum(fed.dcs[0].address))
    )
    with pytest.raises(NodeLookupError) as lookup:
        fed.dcs[1].answer_ntm_info(wrong)
    assert lookup.value.code == "wrong_dc"


async def test_a_removed_home_dc_makes_its_nodes_unreachable(fed):
    b = await register(fed, fed.dcs[1])
    fed.chain.remove(fed.dcs[1].address)
    await fed.dcs[0].cache.wait_for(lambda: not fed.dcs[0].cache.is_active_dc(fed.dcs[1].address), 2)
    with pytest.raises(NodeLookupError) as exc:
        await fed.dcs[0].lookup(b.id)
    assert exc.value.code == "home_dc_inactive"


# --- revocation bites at once; one live session per node (docs/PROTOCOL.md §5) ------------------
def ended_by(dc: Coordinator, n: FakeNode, local: str = "10.1.0.2:4330") -> list[str]:
    """Open a session whose DC-side end is recorded; returns the list of reasons it was ended."""
    reasons: list[str] = []
    s = dc.presence.open(n.id, n.send, (local,), end=reasons.append)
    assert dc.presence.on_keepalive(keepalive.encode_request(n.id, 9, s.token), ("198.18.1.1", 50000)) is not None
    return reasons


async def test_a_newer_session_ends_the_older_one(fed):
    a = await register(fed, fed.dcs[0])
    first = ended_by(fed.dcs[0], a)
    old = fed.dcs[0].presence.sessions[a.id]
    second = ended_by(fed.dcs[0], a)
    assert first == ["superseded by a newer session of this node"] and second == []
    assert not fed.dcs[0].presence.is_live(old) and fed.dcs[0].presence.is_live(fed.dcs[0].presence.sessions[a.id])


async def test_a_revocation_ends_the_session_when_durable_and_directions_stop(fed):
    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    ended = ended_by(fed.dcs[0], a)
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    fed.clock.advance(0.01)
    revoke = RegistrationRequest.signed(a.key, fed.dcs[0].info(), fed.clock.wall_ms(), (), revoked=True)
    await fed.dcs[0].register(revoke, wait_confirmed=False)  # durable; the chain has not seen it yet
    assert ended == ["node revoked"] and a.id not in fed.dcs[0].presence.sessions
    with pytest.raises(DirectionError) as exc:  # b asks for a route to the revoked node
        await fed.dcs[1].signaling.request(b.id, a.id)
    assert exc.value.code in ("revoked", "offline") and b.directions() == []


async def test_a_revocation_from_the_chain_ends_the_session_at_the_home_dc(fed):
    """The node is revoked through another DC (its record names that DC): its home DC hears it
    from the chain and ends the session there."""
    a = await register(fed, fed.dcs[0])
    ended = ended_by(fed.dcs[0], a)
    await register(fed, fed.dcs[1], revoked=True, node=a)
    assert ended == ["node revoked"]


async def test_a_revoked_requester_gets_no_direction_and_its_peer_no_push(fed):
    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    # the revocation is on chain (dc1's cache has it) but dc1's own row still says "not revoked"
    fed.chain.nodes[a.id] = type(fed.chain.nodes[a.id])(
        fed.chain.nodes[a.id].dc, fed.chain.nodes[a.id].timestamp + 1, True
    )
    fed.dcs[0].cache.nodes[a.id] = fed.chain.nodes[a.id]
    with pytest.raises(DirectionError) as exc:
        await fed.dcs[0].signaling.request(a.id, b.id)
    assert exc.value.code == "revoked" and b.directions() == [] and a.directions() == []


async def test_unknown_ids_cost_no_chain_call(fed):
    """A whois or direction for a random ID is answered from the registry cache: no chain read,
    whatever the number of such requests (the DC is no amplifier of chain calls)."""
    before = fed.chain.lookups
    results = await asyncio.gather(*(fed.dcs[0].cache.resolve(keys.node_id_of(keys.generate())) for _ in range(100)))
    assert results == [None] * 100 and fed.chain.lookups == before


async def test_a_node_registered_a_moment_ago_is_found_without_a_chain_call(fed):
    n = FakeNode(*(lambda k: (k, keys.node_id_of(k)))(keys.generate()))
    lookup = asyncio.create_task(fed.dcs[1].cache.resolve(n.id))  # asks before the event arrives
    await asyncio.sleep(0)
    await register(fed, fed.dcs[0], node=n)
    assert (await lookup).dc == fed.dcs[0].address and fed.chain.lookups == 0


async def test_forged_keepalives_are_counted_not_logged_one_by_one(fed, caplog):
    """Anyone can send keepalives: a flood of forged ones costs one summary line per 10 s, not a
    log line per packet (it was ~126 B of log per 45 B packet)."""
    a = await register(fed, fed.dcs[0])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    presence = fed.dcs[0].presence
    caplog.set_level("INFO", logger="ntm.dc.presence")
    caplog.clear()
    for i in range(1000):
        forged = keepalive.encode_request(a.id, 100 + i, b"\x00" * 32)  # a token nobody was given
        assert presence.on_keepalive(forged, ("203.0.113.9", 1000 + i)) is None
    presence.on_keepalive(b"junk", ("203.0.113.9", 1))
    presence.on_keepalive(
        keepalive.encode_request(keys.node_id_of(keys.generate()), 1, b"\x00" * 32), ("203.0.113.9", 2)
    )
    assert presence.dropped == {"bad_mac": 1000, "malformed": 1, "no_session": 1}
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
    fed.clock.advance(10.0)
    presence.on_keepalive(b"junk", ("203.0.113.9", 1))
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2 and "999 bad_mac, 2 malformed, 1 no_session" in lines[1]
    assert presence.observed(a.id) == ("198.18.1.1:50000", "198.18.1.1:50000")  # nothing moved


async def test_a_route_direction_is_accepted_only_by_the_dc_it_names(fed):
    """A direction signed for delivery by dc2 (the peer's home) is refused by dc1: it cannot be
    replayed at another DC to push a route to a node there."""
    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    await fed.dcs[0].signaling.request(a.id, b.id)
    [pushed] = [m["direction"] for m in b.pushed if m.get("type") == "direction"]
    assert messages.decode(messages.RouteDirection, pushed["body"]).home_dc == keys.checksum(fed.dcs[1].address)
    body = messages.decode(messages.RouteDirection, pushed["body"])
    body.node = keys.checksum(a.id)  # a node that lives at dc1, in a direction dc2 was to deliver
    forged = fed.dcs[1].federation.seal(messages.ROUTE_DIRECTION, body)
    with pytest.raises(NodeLookupError) as exc:  # a fresh envelope from an active DC, but for dc2's delivery
        await fed.dcs[0].signaling.accept_delivery(forged)
    assert exc.value.code == "wrong_dc" and len(a.directions()) == 1


async def test_a_racing_revocation_and_newer_registration_are_not_both_accepted(fed):
    """Revoke (t1) and a newer registration (t2 > t1) arrive together: only the first is accepted,
    and what the DC says afterwards is what the chain holds."""
    a = await register(fed, fed.dcs[0])
    t1 = fed.clock.wall_ms() + 10
    revoke = RegistrationRequest.signed(a.key, fed.dcs[0].info(), t1, (), revoked=True)
    newer = RegistrationRequest.signed(a.key, fed.dcs[0].info(), t1 + 5, ("10.0.0.9:4330",))
    results = await asyncio.gather(
        fed.dcs[0].register(revoke, wait_confirmed=True),
        fed.dcs[0].register(newer, wait_confirmed=True),
        return_exceptions=True,
    )
    assert results[0].status == "confirmed"
    assert isinstance(results[1], RegistrationError) and results[1].code == "revoked"
    assert fed.chain.nodes[a.id].revoked
    info, _ = await fed.dcs[0].lookup(a.id)
    assert info.revoked and fed.dcs[0].latest(a.id)[1]


async def test_the_dcs_view_follows_a_revocation_that_landed_elsewhere(fed):
    """The node's newer record is only pending here when a revocation through the other DC wins on
    chain: this DC then says "revoked", as the chain does, not what its own row says."""
    a = await register(fed, fed.dcs[0])
    fed.clock.advance(0.01)
    await register(fed, fed.dcs[1], revoked=True, node=a)  # through dc2: on chain, dc1's cache has it
    fed.dcs[0].store.db.execute("UPDATE nodes SET timestamp = timestamp + 1000000 WHERE node = ?", (a.id,))
    info, home = await fed.dcs[0].lookup(a.id)  # dc1's own row is "newer", yet the chain's revocation wins
    assert home == fed.dcs[0].address and info.revoked


async def test_a_rollback_that_lost_confirmed_records_gets_them_back_on_chain(fed):
    """A chain node restarted from an older state: records the DC said were confirmed are gone.
    The follower sees the head go back, rebuilds its cache, and the submitter sends them again."""
    before = fed.chain.snapshot()
    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[0])
    fed.chain.restore(before)
    assert a.id not in fed.chain.nodes and b.id not in fed.chain.nodes
    dc = fed.dcs[0]
    assert await dc.cache.wait_for(lambda: a.id in fed.chain.nodes and b.id in fed.chain.nodes, 5)
    assert dc.cache.rollbacks == 1 and dc.submitter.reopened == 2
    assert fed.chain.nodes[a.id].dc == dc.address
    assert await dc.cache.wait_for(lambda: a.id in dc.cache.nodes, 2)
    assert dc.store.count_outbox("pending") == 0 and dc.store.count_outbox("confirmed") == 2


async def test_a_reorg_at_the_same_height_is_seen_by_its_hash(fed):
    """Same head number, different block: only the hash tells. Records still on chain stay confirmed."""
    a = await register(fed, fed.dcs[0])
    dc = fed.dcs[0]
    await dc.cache.wait_for(lambda: dc.cache.block == fed.chain.block, 2)
    fed.chain.hashes[-1] = b"\xee" * 32  # the same events, in a block with another hash
    assert await dc.cache.wait_for(lambda: dc.cache.rollbacks == 1, 2)
    assert dc.submitter.reopened == 0 and a.id in dc.cache.nodes


async def test_a_height_mined_again_after_a_chain_restart_is_a_rollback(fed):
    """The chain node is killed (kill -9 of anvil run with --state-interval 1) and comes back from its
    state file without its last block; our next transaction lands at that height again before the
    follower polls. The DC compares the new block's hash with the one it remembered there: the old
    one is kept (in memory and in its database), so the fork is found at that height and the record
    it had called confirmed in the lost block goes back to pending and onto the chain again."""
    dc = fed.dcs[0]
    fed.tasks[0].cancel()  # dc1's follower polls only when this test says
    await dc.cache.poll()
    before = fed.chain.snapshot()

    async def confirmed(clock_step: float = 0.01) -> tuple[bytes, int, int]:
        key = keys.generate()
        fed.clock.advance(clock_step)
        res = await dc.register(
            RegistrationRequest.signed(key, dc.info(), fed.clock.wall_ms(), ()), wait_confirmed=True
        )
        assert res.status == "confirmed"
        return keys.node_id_of(key), res.timestamp, res.block

    a, a_ts, lost = await confirmed()
    lost_hash = fed.chain.hashes[lost]
    fed.chain.restore(before)  # the restart: block `lost` is gone
    b, _, again = await confirmed()
    assert again == lost and fed.chain.hashes[again] != lost_hash and a not in fed.chain.nodes
    assert (lost, lost_hash) in dc.store.blocks()  # the new hash did not replace the old one
    await dc.cache.poll()
    assert dc.cache.rollbacks == 1 and dc.submitter.reopened == 1  # a, not b (b is on chain)
    state = await asyncio.wait_for(dc.submitter.confirmed(a, a_ts), 5)
    assert state[0] == "confirmed" and fed.chain.nodes[a].dc == dc.address and b in fed.chain.nodes
    assert (lost, lost_hash) not in dc.store.blocks()  # a restart of the DC does not see this rollback again


async def test_with_the_chain_down_registrations_are_durable_then_confirmed(fed):
    a = await register(fed, fed.dcs[0])
    fed.chain.down = True
    n = FakeNode(*(lambda k: (k, keys.node_id_of(k)))(keys.generate()))
    req = RegistrationRequest.signed(n.key, fed.dcs[0].info(), fed.clock.wall_ms(), ())
    assert (await fed.dcs[0].register(req, wait_confirmed=False)).status == "durable"
    info, _ = await fed.dcs[1].lookup(a.id)  # lookups and federation go on from the cache
    assert info.node == keys.checksum(a.id)
    await asyncio.sleep(0.3)
    assert n.id not in fed.chain.nodes
    fed.chain.down = False
    state = await asyncio.wait_for(fed.dcs[0].submitter.confirmed(n.id, req.record.timestamp), 10)
    assert state[0] == "confirmed" and fed.chain.nodes[n.id].dc == fed.dcs[0].address


# --- the peer's answer to a pushed direction (docs/PROTOCOL.md §8.1) ---------------------------
@pytest.mark.parametrize("refusal", ["not_allowed", "peer_busy"])
async def test_a_peer_that_refuses_a_direction_fails_the_request_with_its_reason(fed, refusal):
    """The peer (at another DC) refuses: its home DC's federation answer carries the refusal and
    the requester's DC fails the Direction Request with it; the requester is pushed nothing."""
    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    b.refuse = refusal
    with pytest.raises(DirectionError) as exc:
        await fed.dcs[0].signaling.request(a.id, b.id)
    assert exc.value.code == refusal and keys.checksum(b.id) in str(exc.value)
    assert exc.value.abandoned is None and a.directions() == [] and len(b.directions()) == 1
    assert fed.dcs[1].signaling.counters["directions_refused_by_peer"] == 1
    assert fed.dcs[0].signaling.counters["directions_failed"] == 1


async def test_a_refusal_after_the_requester_was_directed_names_the_abandoned_path(fed):
    """The peer is behind a NAT and the requester public, so the peer initiates and the
    requester is directed first; the peer then refuses: the error names that path, so the
    requester's node stops listening on it instead of waiting out the handshake timeout."""
    a, b = await register(fed, fed.dcs[0], "198.18.1.1:50000"), await register(fed, fed.dcs[0])
    go_online(fed.dcs[0], a, "198.18.1.1:50000", ("198.18.1.1", 50000))  # public: seen where it is
    go_online(fed.dcs[0], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    b.refuse = "not_allowed"
    with pytest.raises(DirectionError) as exc:
        await fed.dcs[0].signaling.request(a.id, b.id)
    [da] = a.directions()
    assert (da.kind, da.role) == ("nat_initiates", "wait")
    assert exc.value.code == "not_allowed" and exc.value.abandoned == bytes.fromhex(da.path)


async def test_a_peer_that_never_answers_fails_the_request_within_the_ack_deadline(fed, monkeypatch):
    """Adversary: a peer whose session is dead without the DC knowing (or a node that never
    acknowledges). The request fails peer_unresponsive after the ack deadline, and the DC keeps
    no state for the push; acks for paths nobody waits for, or from another node, change nothing."""
    from dc import signaling

    monkeypatch.setattr(signaling, "DIRECTION_ACK_TIMEOUT_S", 0.3)
    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[0])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    go_online(fed.dcs[0], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    b.silent = True
    sig = fed.dcs[0].signaling
    request = asyncio.create_task(sig.request(a.id, b.id))
    while not b.directions():
        await asyncio.sleep(0.01)
    [db] = b.directions()
    sig.on_ack(a.id, messages.DirectionAck(db.path, "not_allowed"))  # another node cannot answer for b
    with pytest.raises(DirectionError) as exc:
        await request
    assert exc.value.code == "peer_unresponsive" and sig.counters["directions_unacknowledged"] == 1
    assert sig._acks == {}
    sig.on_ack(b.id, messages.DirectionAck(db.path, "not_allowed"))  # late: nobody waits
    sig.on_ack(b.id, messages.DirectionAck("00" * 8))  # a path nobody pushed
    assert sig._acks == {}


# --- one reply per Direction Request (issue 26 item 5, docs/PROTOCOL.md §8.1) -------------------
def opened(direction: messages.SignedEnvelope) -> tuple[bytes, messages.RouteDirection]:
    """The signer and body of a Route Direction handed back in a result."""
    env = envelope.open_envelope(messages.encode(direction), messages.ROUTE_DIRECTION, direction.ts, lambda dc: True)
    return env.sender, messages.decode(messages.RouteDirection, env.body)


@pytest.mark.parametrize("peer_dc", [0, 1])
@pytest.mark.parametrize("requester_public", [False, True])
async def test_the_requester_gets_its_direction_in_the_one_reply(fed, peer_dc, requester_public):
    """Same DC and across DCs, the peer listening (punch) or starting (a public requester, the peer
    behind a NAT): the requester's Route Direction, signed by its DC, comes back with the route and
    nothing is pushed to it; the peer got (and accepted) its own before the reply was made."""
    local, seen = (
        ("198.18.1.1:50000", ("198.18.1.1", 50000)) if requester_public else ("10.1.0.2:4330", ("198.18.1.1", 50000))
    )
    a, b = await register(fed, fed.dcs[0], local), await register(fed, fed.dcs[peer_dc])
    go_online(fed.dcs[0], a, local, seen)
    go_online(fed.dcs[peer_dc], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    route, direction = await fed.dcs[0].signaling.request(a.id, b.id, inline=True)
    assert direction is not None and a.pushed == []
    signer, da = opened(direction)
    [db] = b.directions()
    assert signer == fed.dcs[0].address and da.node == keys.checksum(a.id) and da.requester == keys.checksum(a.id)
    assert (
        (da.path, da.kind, da.role, da.reason)
        == (route.path, route.kind, route.role, route.reason)
        == (
            db.path,
            db.kind,
            route.role,
            db.reason,
        )
    )
    assert (da.kind, da.role, db.role) == (
        ("nat_initiates", "wait", "initiate") if requester_public else ("punch", "punch", "punch")
    )
    assert da.relay.side == 0 and db.relay.side == 1 and da.peer_pubkey == keys.public_bytes(b.key).hex()


@pytest.mark.parametrize(
    "refusal, peer_dc, requester_public",
    # each refusal at the requester's DC and across DCs, with the peer initiating in one of the two
    [(r, 0, True) for r in ("not_allowed", "offline")]
    + [(r, 1, False) for r in ("not_allowed", "offline")]
    + [(r, 0, False) for r in ("peer_busy", "silent")]
    + [(r, 1, True) for r in ("peer_busy", "silent")],
)
async def test_a_refused_one_reply_request_gives_the_requester_nothing_to_follow(
    fed, monkeypatch, peer_dc, requester_public, refusal
):
    """Adversary: a peer that refuses us (allow list, its rates), never answers (a dead session its
    DC has not noticed), or is offline, in either order of directing and at either DC. The request
    fails with the peer's reason and the requester was handed no direction (no half-opened path to
    abandon, so the error names none)."""
    from dc import signaling

    monkeypatch.setattr(signaling, "DIRECTION_ACK_TIMEOUT_S", 0.2)
    local, seen = (
        ("198.18.1.1:50000", ("198.18.1.1", 50000)) if requester_public else ("10.1.0.2:4330", ("198.18.1.1", 50000))
    )
    a, b = await register(fed, fed.dcs[0], local), await register(fed, fed.dcs[peer_dc])
    go_online(fed.dcs[0], a, local, seen)
    if refusal != "offline":
        go_online(fed.dcs[peer_dc], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    b.refuse, b.silent = (refusal, False) if refusal in ("not_allowed", "peer_busy") else (None, refusal == "silent")
    with pytest.raises(DirectionError) as exc:
        await fed.dcs[0].signaling.request(a.id, b.id, inline=True)
    want = {"silent": "peer_unresponsive"}.get(refusal, refusal)
    assert exc.value.code == want and exc.value.abandoned is None and a.pushed == []


async def test_the_session_answers_one_reply_or_the_old_pair_as_the_request_asks(fed):
    """The session handler: an `inline` request gets one message (the result with the direction); a
    request without it (a node from before) the old pair, its direction pushed then the result; a
    refusal carries the code and no direction; a session that dropped before the answer costs nothing."""
    from dc.server import direction_request

    a, b = await register(fed, fed.dcs[0]), await register(fed, fed.dcs[1])
    go_online(fed.dcs[0], a, "10.1.0.2:4330", ("198.18.1.1", 50000))
    go_online(fed.dcs[1], b, "10.2.0.2:4330", ("198.18.2.1", 50001))
    sent: list[messages.Message] = []

    async def send(msg: messages.Message) -> None:
        sent.append(msg)

    async def gone(msg: messages.Message) -> None:
        raise ConnectionError("session closed")

    peer = keys.checksum(b.id)
    await direction_request(fed.dcs[0], send, a.id, messages.DirectionRequest(1, peer, inline=True))
    [one] = sent
    assert one.id == 1 and one.direction is not None and opened(one.direction)[1].path == one.route.path
    assert a.pushed == []
    await direction_request(fed.dcs[0], send, a.id, messages.DirectionRequest(2, peer))
    assert sent[1].id == 2 and sent[1].direction is None and a.directions()[0].path == sent[1].route.path
    b.refuse = "not_allowed"
    await direction_request(fed.dcs[0], send, a.id, messages.DirectionRequest(3, peer, inline=True))
    assert (sent[2].error.error, sent[2].direction, sent[2].route) == ("not_allowed", None, None)
    b.refuse = None
    await direction_request(fed.dcs[0], gone, a.id, messages.DirectionRequest(4, peer, inline=True))
    assert len(sent) == 3 and len(a.pushed) == 1

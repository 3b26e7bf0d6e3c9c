"""A DC's Relay Directions to one relay in one event-loop turn leave as one batch (§8.2 "Batches").

The DC side on fakes: a FederationClient whose requests go to in-process relay handlers (the real
rs/server.py booking code behind the fake transport). Adversaries and hostile conditions: a
relay that refuses one direction of a batch (a path live with another token), one from before
batches (it answers their path 400), and a batch whose envelope is forged.
"""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import pytest

from dc.federation import FederationClient, FederationError
from ntm import envelope, keys, messages
from tests.fakes import FakeClock
from rs import server
from rs.relay import RelayTable

RS = "http://rs.test:8340"
ADVERTISE = ["192.0.2.7:3478"]


class FakeRelay:
    """rs/server.py's booking handlers on a real RelayTable, trusting `dcs`; each POST recorded."""

    def __init__(self, clock: FakeClock, dcs: set[bytes], batches: bool = True) -> None:
        self.relay = SimpleNamespace(
            clock=clock,
            trust=SimpleNamespace(is_active=lambda a: a in dcs),
            guard=envelope.ReplayGuard(),
            table=RelayTable(),
            directions={"accepted": 0, "refused": 0},
            refused={},
            streams_advertise=[],
            advertise_to=lambda _request: ADVERTISE,
            log_events=lambda: None,
        )
        self.relay.refuse = lambda status, code, message: server.Relay.refuse(self.relay, status, code, message)
        self.posts: list[str] = []
        self.batches = batches

    async def post(self, url: str, body: dict) -> tuple[int, dict]:
        path = url.removeprefix(RS)
        self.posts.append(path)
        if path == messages.RELAY_BATCH_PATH and not self.batches:  # a relay from before batches
            return 400, {"error": "malformed", "message": f"no call {path!r} at a relay"}
        return server.BOOKERS[path](self.relay, None, body)


def direction(clock: FakeClock, path: bytes | None = None, token: bytes | None = None) -> messages.RelayDirection:
    nodes = [keys.checksum(os.urandom(20)) for _ in range(2)]
    path, token = path or os.urandom(8), token or os.urandom(32)
    return messages.RelayDirection(path.hex(), token.hex(), nodes, clock.wall_ms() + 60_000, 1 << 20)


@pytest.fixture
def dc():
    clock = FakeClock()
    key = keys.generate()
    rs = FakeRelay(clock, {keys.node_id_of(key)})
    return SimpleNamespace(
        clock=clock,
        key=key,
        rs=rs,
        fed=FederationClient(key, lambda _a: True, envelope.ReplayGuard(), clock, transport=rs.post),
    )


async def test_bookings_of_one_turn_go_in_one_batch_and_each_gets_its_own_answer(dc):
    """Ten bookings in one turn cost one POST (one signature); the one whose path is live with
    another token gets the relay's conflict, the other nine their paths."""
    taken = direction(dc.clock)
    await dc.fed.book_relay(RS, taken)
    assert dc.rs.posts == ["/v1/relay-directions"]  # alone: a plain Relay Direction
    wanted = [direction(dc.clock) for _ in range(9)] + [direction(dc.clock, bytes.fromhex(taken.path))]
    answers = await asyncio.gather(*(dc.fed.book_relay(RS, d) for d in wanted), return_exceptions=True)
    assert dc.rs.posts[1:] == [messages.RELAY_BATCH_PATH]
    assert [a.path for a in answers[:9]] == [d.path for d in wanted[:9]]
    assert all(a.relay == ADVERTISE and a.created for a in answers[:9])
    assert isinstance(answers[9], FederationError) and (answers[9].code, answers[9].status) == ("conflict", 409)
    assert len(dc.rs.relay.table.paths) == 10 and dc.rs.relay.refused == {"conflict": 1}


async def test_a_relay_from_before_batches_gets_each_direction_alone(dc):
    """A relay that answers the batch path 400 books every direction all the same, one request
    each, and is sent no batch again for a while."""
    dc.rs.batches = False
    for _ in range(2):
        answers = await asyncio.gather(*(dc.fed.book_relay(RS, direction(dc.clock)) for _ in range(3)))
        assert len(answers) == 3 and len(dc.rs.relay.table.paths) in (3, 6)
    assert dc.rs.posts == [messages.RELAY_BATCH_PATH] + ["/v1/relay-directions"] * 6


async def test_a_forged_or_untrusted_batch_books_nothing(dc):
    """A batch signed by a key that is no active DC, or tampered after signing, is refused whole
    (403) and adds no path; more directions than RELAY_BATCH_MAX are malformed."""
    many = messages.RelayDirections([direction(dc.clock) for _ in range(3)])
    outsider = envelope.seal_body(keys.generate(), messages.RELAY_DIRECTIONS, many, dc.clock.wall_ms())
    status, body = await dc.rs.post(RS + messages.RELAY_BATCH_PATH, outsider)
    assert (status, body["error"]) == (403, "untrusted_dc")
    tampered = envelope.seal_body(dc.key, messages.RELAY_DIRECTIONS, many, dc.clock.wall_ms())
    tampered["body"]["directions"][0]["max_bytes"] = 1 << 40
    status, body = await dc.rs.post(RS + messages.RELAY_BATCH_PATH, tampered)
    assert (status, body["error"]) == (403, "forbidden")
    too_many = envelope.seal(
        dc.key,
        messages.RELAY_DIRECTIONS,
        {"directions": [messages.encode(direction(dc.clock))] * (messages.RELAY_BATCH_MAX + 1)},
        dc.clock.wall_ms(),
    )
    status, body = await dc.rs.post(RS + messages.RELAY_BATCH_PATH, too_many)
    assert (status, body["error"]) == (400, "malformed")
    assert not dc.rs.relay.table.paths

"""RelayTable.on_run, sans-I/O: a GRO run (datagrams back to back, one sender) gets exactly the
verdicts and accounting its datagrams would get one by one, batched for GSO sends."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ntm import packet
from rs.relay import gso_batches
from tests.test_relay import PATH, A, B, EVIL, T0, bind, bound_table, data

SECRET = bytes(32)
OTHER_PATH = PATH[:-1] + b"\xff"  # differs in the last byte only
SEG = len(data())


def split(batches: list) -> list:
    """The (datagram, destination) pairs a list of GSO batches puts on the wire."""
    return [(b[off : off + seg], dest) for b, seg, dest in batches for off in range(0, len(b), seg)]


def one_by_one(run: list[bytes], addr, now: float = T0 + 1, **kw) -> tuple:
    """What today's per-datagram path does with `run`, on a fresh twin of the table."""
    t = bound_table(secret=SECRET, **kw)
    out = [o for d in run for o in t.on_datagram(d, addr, now)]
    return out, t


def as_run(run: list[bytes], addr, now: float = T0 + 1, **kw) -> tuple:
    t = bound_table(secret=SECRET, **kw)
    return t.on_run(b"".join(run), len(run[0]), addr, now), t


def same_state(a, b) -> None:
    assert a.dropped == b.dropped and a.removed == b.removed
    assert (a.forwarded_packets, a.forwarded_bytes) == (b.forwarded_packets, b.forwarded_bytes)
    assert {k: p.stats() for k, p in a.paths.items()} == {k: p.stats() for k, p in b.paths.items()}


def test_a_run_of_one_paths_packets_is_one_batch_forwarded_whole():
    run = [data(bytes([i]) * 40, counter=i) for i in range(10)] + [data(b"end", counter=10)]
    out, t = as_run(run, A)
    assert out == [(b"".join(run), SEG, B)]
    assert t.paths[PATH].packets == [11, 0] and t.forwarded_packets == 11
    same_state(t, one_by_one(run, A)[1])


def test_a_foreign_datagram_in_a_run_is_the_only_one_dropped():
    """Adversary: a datagram of another path (or a forged one) coalesced into a node's run."""
    run = [data(counter=i) for i in range(8)]
    run[3] = data(path=OTHER_PATH, counter=3)
    out, t = as_run(run, A)
    assert split(out) == [(d, B) for i, d in enumerate(run) if i != 3]
    assert t.dropped == {"unknown_path": 1} and t.forwarded_packets == 7
    same_state(t, one_by_one(run, A)[1])


def test_the_datagram_over_the_budget_is_the_only_one_dropped():
    """Hostile condition: the run's last datagram would overrun the path's byte budget."""
    run = [data(counter=i) for i in range(6)]
    out, t = as_run(run, A, max_bytes=5 * SEG)
    assert split(out) == [(d, B) for d in run[:5]]
    assert t.dropped == {"byte_cap": 1} and t.removed["byte_cap"] == 1 and PATH not in t.paths
    same_state(t, one_by_one(run, A, max_bytes=5 * SEG)[1])
    out, t = as_run(run, A, max_bytes=6 * SEG)  # exactly enough: all go
    assert out == [(b"".join(run), SEG, B)] and t.dropped == {}
    out, t = as_run(run, A, max_bytes=6 * SEG - 1)  # one byte short: the last one is dropped
    assert split(out) == [(d, B) for d in run[:5]] and t.dropped == {"byte_cap": 1}


def test_a_strangers_run_is_dropped_and_counted_whole():
    """Adversary: a stranger sprays runs at the relay: an unknown path, or a known one from an
    address bound to neither side. Each of its datagrams is counted, none forwarded."""
    for run, reason in (
        ([data(path=OTHER_PATH)] * 20, "unknown_path"),
        ([data()] * 20, "unknown_sender"),
        ([b"\xff" * SEG] * 20, "malformed"),
    ):
        out, t = as_run(run, EVIL)
        assert out == [] and t.dropped == {reason: 20} and t.forwarded_packets == 0


def test_binds_in_a_run_are_answered_each():
    """A run of binds (all 50 bytes) gets one answer per bind, as one batch back to the sender."""
    run = [bind(0, counter=10**9 + i) for i in range(3)]  # above the counters bound_table uses
    out, t = as_run(run, A)
    assert [dest for _, dest in split(out)] == [A] * 3 and len(out) == 1
    assert t.dropped == {}


def test_gso_batches_keep_order_and_end_a_batch_after_a_shorter_datagram():
    items = [(b"a" * 4, B), (b"b" * 4, B), (b"c" * 2, B), (b"d" * 4, B), (b"e" * 4, A), (b"f" * 5, A)]
    assert gso_batches(items) == [(b"aaaabbbbcc", 4, B), (b"dddd", 4, B), (b"eeee", 4, A), (b"fffff", 5, A)]
    assert gso_batches([]) == []


pieces = st.sampled_from(["data", "other", "bind", "short", "junk", "keepalive"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(pieces, min_size=1, max_size=30),
    st.sampled_from([A, B, EVIL]),
    st.builds(lambda k, d: k * SEG + d, st.integers(1, 40), st.integers(-1, 1)),  # budgets at the edges
    st.floats(0, 200),
)
def test_a_run_gets_exactly_the_verdicts_of_its_datagrams_one_by_one(kinds, addr, budget, dt):
    made = {
        "data": data(),
        "other": data(path=OTHER_PATH),
        "bind": bind(1, counter=1) + bytes(SEG - packet.RELAY_BIND_LEN),  # padded: a bad bind
        "short": data()[:5],
        "junk": b"\x42" * SEG,
        "keepalive": bytes([packet.TYPE_KEEPALIVE]) + PATH + bytes(SEG - packet.PREFIX_LEN),
    }
    run = [made[k] for k in kinds]
    if any(len(d) < SEG for d in run[:-1]):  # GRO runs only end with a shorter datagram
        run = [d for d in run if len(d) == SEG] or [made["data"]]
    out, t = as_run(run, addr, T0 + dt, max_bytes=budget)
    want, twin = one_by_one(run, addr, T0 + dt, max_bytes=budget)
    assert split(out) == want
    same_state(t, twin)

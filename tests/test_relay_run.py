"""RelayTable.on_run, sans-I/O: a GRO run (datagrams back to back, one sender) gets exactly the
verdicts and accounting its datagrams would get one by one, batched for GSO sends."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ntm import packet
from rs.relay import gso_batches
from tests.test_relay import PATH, A, B, EVIL, T0, acked, bind, bind_at, bound_table, data, table_with_path

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


def decisions(t) -> list:
    """Counts the table's per-datagram decisions (calls of on_datagram) from now on."""
    calls: list = []
    real = t.on_datagram
    t.on_datagram = lambda *a: calls.append(a) or real(*a)
    return calls


def test_a_strangers_spray_costs_one_decision_per_run_and_every_datagram_is_counted():
    """Adversary: a stranger sprays runs of 20 at the relay (an unknown path, a known path from an
    address bound to neither side, or a path whose other side never bound). The relay decides each
    run once (no per-datagram work) and counts all its datagrams, run after run."""
    half = table_with_path()
    assert acked(bind_at(half, 0, A, T0), 0, A)
    for t, run, addr, reason in (
        (bound_table(), [data(path=OTHER_PATH)] * 20, EVIL, "unknown_path"),
        (bound_table(), [data()] * 20, EVIL, "unknown_sender"),
        (half, [data()] * 20, A, "peer_unbound"),
    ):
        calls = decisions(t)
        for _ in range(2):
            assert t.on_run(b"".join(run), SEG, addr, T0 + 1) == []
        assert t.dropped == {reason: 40} and not calls, reason


def test_a_nodes_run_is_decided_once_even_with_mixed_packet_types_and_at_its_exact_budget():
    """The common case costs one decision: DATA and KEEPALIVE of one path (a node's tunnel), and a
    run that uses the path's byte budget exactly, are forwarded whole without per-datagram work; the
    path's activity time is the run's."""
    keepalive = bytes([packet.TYPE_KEEPALIVE]) + PATH + bytes(SEG - packet.PREFIX_LEN)
    run = [data(counter=0), keepalive, data(counter=1), data(b"end", counter=2)]
    t = bound_table(max_bytes=len(b"".join(run)))
    calls = decisions(t)
    assert t.on_run(b"".join(run), SEG, A, T0 + 7) == [(b"".join(run), SEG, B)]
    assert not calls and t.paths[PATH].last_active == T0 + 7 and t.paths[PATH].packets == [4, 0]


def test_a_datagram_whose_path_differs_in_its_first_byte_is_not_taken_for_the_runs_path():
    """Adversary: a datagram naming a path that differs from the run's in one byte only, at either
    end of the path ID."""
    for other in (bytes([PATH[0] ^ 1]) + PATH[1:], OTHER_PATH):
        run = [data(counter=i) for i in range(4)]
        run[2] = data(path=other, counter=2)
        out, t = as_run(run, A)
        assert split(out) == [(d, B) for i, d in enumerate(run) if i != 2]
        assert t.dropped == {"unknown_path": 1}


def test_a_run_with_no_segment_size_is_decided_as_one_datagram():
    """Hostile condition: the kernel reports no (zero) GRO segment size for a long read."""
    run = data() * 3
    t = bound_table()
    assert t.on_run(run, 0, A, T0 + 1) == gso_batches(bound_table().on_datagram(run, A, T0 + 1))


def test_a_run_of_one_byte_datagrams_counts_each_as_malformed():
    """Adversary: a stranger sprays 1-byte datagrams, which GRO coalesces into one run."""
    t = bound_table()
    assert t.on_run(data(), 1, EVIL, T0 + 1) == [] and t.dropped == {"malformed": SEG}


def test_a_run_ending_in_a_bare_header_is_still_decided_once():
    """The shortest datagram a path's run can end with, type and path ID only (9 bytes), keeps the
    run on the one-decision path (the relay reads no further than the path ID)."""
    run = [data(counter=0), data(counter=1), data()[: packet.PREFIX_LEN]]
    t = bound_table()
    calls = decisions(t)
    assert t.on_run(b"".join(run), SEG, A, T0 + 1) == [(b"".join(run), SEG, B)] and not calls

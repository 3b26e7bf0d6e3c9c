"""The pure limit decisions of ntm/ratelimit.py, driven by a FakeClock (issue 29 item 5)."""

from __future__ import annotations

import pytest

from ntm.ratelimit import Buckets, Concurrency, FairShare, RisingCost, TokenBucket, source_prefix
from tests.fakes import FakeClock


def fair() -> FairShare:
    return FairShare(per_key=(0.5, 8.0), total=(16.0, 64.0), cap=(32.0, 128.0), active_s=16.0, max_keys=4096)


@pytest.mark.parametrize("interval_s", [0.5, 1.0, 2.0, 4.0])
def test_a_crowd_gets_the_total_between_them_however_it_paces(interval_s):
    """Adversary: 64 identities each asking every `interval_s` (at once, then paced: asking
    slowly enough to look "light" must not help). Together they get about the total (16/s) and
    never the hard cap; a peer asking for the first time, and each of 8 more, still gets through."""
    clock = FakeClock()
    f = fair()
    crowd = [f"attacker{i}" for i in range(64)]
    granted = 0
    for _ in range(int(30 / interval_s)):  # 30 s of flood
        granted += sum(f.take(key, clock.now()) for key in crowd)
        clock.advance(interval_s)
    assert granted <= 64 + 16 * 30 * 1.1  # the total's burst and rate, not the cap's
    assert [f.take(f"legit{i}", clock.now()) for i in range(8)] == [True] * 8


def test_fair_share_still_bounds_each_key_and_the_cap():
    """Adversary: one peer asking nonstop gets its own burst then its rate; a crowd of first-time
    keys (each with its burst of one) is stopped by the hard cap."""
    clock = FakeClock()
    f = fair()
    assert sum(f.take("one", clock.now()) for _ in range(100)) == 8
    clock.advance(2.0)
    assert sum(f.take("one", clock.now()) for _ in range(100)) == 1
    assert sum(f.take(f"k{i}", clock.now()) for i in range(500)) == 127  # the cap (full again) less "one"'s


def test_fair_share_forgets_keys_that_stopped_asking():
    clock = FakeClock()
    f = fair()
    for i in range(64):
        f.take(i, clock.now())
    assert f.share(clock.now()) == (0.25, 1.0)
    clock.advance(16.0)
    assert f.share(clock.now()) == (0.5, 8.0) and not f._active and not f._asks


def test_rising_cost_doubles_per_new_thing_and_decays():
    """Adversary: one source registering fresh identities; each costs twice the one before, so
    its burst of 16 tokens buys 4 (1+2+4+8), and the count halves every half-life."""
    clock = FakeClock()
    cost = RisingCost(rate=16 / 3600, burst=16.0, half_life_s=3600.0, max_keys=100)
    taken = []
    for _ in range(6):  # a tenth of a second apart: the count must not decay below a whole one
        taken.append(cost.take("src", clock.now()))
        clock.advance(0.1)
    assert taken == [True] * 4 + [False] * 2
    assert cost.take("other", clock.now())  # keys are independent
    assert cost.cost("src", clock.now()) == 16
    clock.advance(3600)  # the count halves (4 → 2): the next costs 4; the bucket refilled 16
    assert cost.cost("src", clock.now()) == 4
    assert cost.take("src", clock.now())


def test_rising_cost_memory_is_bounded():
    clock = FakeClock()
    cost = RisingCost(rate=1.0, burst=16.0, half_life_s=3600.0, max_keys=10)
    for i in range(1000):
        cost.take(i, clock.now())
    assert len(cost._counts) == 10 and len(cost.buckets) == 10


def test_concurrency_per_key_and_forgets_idle_keys():
    """Adversary: one address opening sockets it never authenticates."""
    held = Concurrency(limit=2)
    assert [held.acquire("a") for _ in range(3)] == [True, True, False]
    assert held.acquire("b")
    held.release("a")
    assert held.acquire("a") and not held.acquire("a")
    assert (held.held("a"), held.held("b"), held.held("c")) == (2, 1, 0)
    for key in ("a", "a", "b"):
        held.release(key)
    assert held.held("a") == 0 and not held._held


def test_token_bucket_available_refills_without_spending():
    b = TokenBucket(rate=1.0, burst=4.0, now=0.0)
    assert b.take(0.0, 4.0) and b.available(2.0) == 2.0 and b.available(2.0) == 2.0


def test_source_prefix_groups_a_network():
    assert source_prefix("203.0.113.7") == source_prefix("203.0.113.200") == "203.0.113.0/24"
    assert source_prefix("::ffff:203.0.113.7") == "203.0.113.0/24"
    assert source_prefix("2001:db8:1:2ff::1") == "2001:db8:1:200::/56"
    assert source_prefix("not an ip") == "not an ip"


def test_rising_cost_halves_per_whole_half_life_since_it_last_counted():
    """Adversary: a source pacing its new identities around the half-life to make its count decay
    faster than it should. The count halves once per whole half-life, measured from where the
    last halving left it (not from zero, nor from the first take), at any clock offset."""
    hl, t0 = 3600.0, 50_000.0
    cost = RisingCost(rate=1.0, burst=1000.0, half_life_s=hl, max_keys=100)
    assert all(cost.take("src", t0) for _ in range(4))
    assert cost.cost("src", t0 + 1.5 * hl) == 4  # 4 → 2 after one whole half-life
    assert cost.take("src", t0 + 1.5 * hl)  # now 3, counted from t0 + hl
    assert cost.cost("src", t0 + 2.1 * hl) == 2  # one more whole half-life since t0 + hl: 3 → 1


def test_rising_cost_forgets_the_least_recently_seen_key():
    """Adversary: many fresh keys pushing a busy source's count out of memory: the one forgotten
    is the key seen least recently, never the one that just took."""
    cost = RisingCost(rate=1.0, burst=1000.0, half_life_s=3600.0, max_keys=2)
    for key in ("a", "b", "a", "c"):
        assert cost.take(key, 0.0)
    assert (cost.cost("a", 0.0), cost.cost("b", 0.0), cost.cost("c", 0.0)) == (4, 1, 2)


def test_fair_share_divides_the_total_among_exactly_the_keys_remembered():
    """One key alone gets the whole total (within its own cap); the asks kept are bounded at
    max_keys × 8 (a ninth forgets the oldest), and every one of them still counts."""
    f = FairShare(per_key=(100.0, 100.0), total=(8.0, 8.0), cap=(1000.0, 1000.0), active_s=100.0, max_keys=1)
    assert f.share(0.0) == (8.0, 8.0)
    for i in range(9):
        f.take(i, 1.0)
    assert f.share(1.0) == (1.0, 1.0) and 0 not in f._active


def test_buckets_remember_the_newest_key_and_forget_the_oldest():
    """Adversary: keys rotating to get fresh bursts: the key that just took keeps its (empty)
    bucket; only the least recently used one is forgotten."""
    b = Buckets(rate=0.0, burst=1.0, max_keys=1)
    assert b.take("a", 0.0) and b.take("b", 0.0)  # b's bucket pushes a's out
    assert not b.take("b", 0.0) and len(b) == 1
    assert b.take("a", 0.0)  # a was forgotten: a fresh burst (the documented cost of the bound)

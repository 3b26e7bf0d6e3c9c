"""The pure limit decisions of ntm/ratelimit.py, driven by a FakeClock (issue 29 item 5)."""

from __future__ import annotations

from ntm.ratelimit import Concurrency, FairShare, RisingCost, TokenBucket, source_prefix
from tests.fakes import FakeClock


def test_fair_share_keeps_a_reserve_that_a_crowd_of_busy_keys_cannot_spend():
    """Adversary: 64 identities each asking as fast as their own bucket allows (the DC lets each
    send 2/s). They drain the shared budget down to the reserve and no further; a peer asking for
    the first time still gets through, and so does the next newcomer after the reserve refills."""
    clock = FakeClock()
    fair = FairShare(per_key=(0.5, 8.0), total=(16.0, 64.0), reserve=32.0, max_keys=4096)
    crowd = [f"attacker{i}" for i in range(64)]
    for _ in range(20):  # 10 s of flood: every attacker asks twice per second
        for key in crowd:
            fair.take(key, clock.now())
        clock.advance(0.5)
    assert [fair.take(f"legit{i}", clock.now()) for i in range(8)] == [True] * 8
    # the crowd's own share stays bounded: above the reserve only
    granted = sum(fair.take(key, clock.now()) for key in crowd)
    assert granted <= fair.shared.burst - fair.reserve
    assert fair.take("legit-late", clock.now())


def test_fair_share_still_bounds_the_total_and_each_key():
    """Adversary: one peer asking nonstop gets its own burst then its rate, never the total."""
    clock = FakeClock()
    fair = FairShare(per_key=(0.5, 8.0), total=(16.0, 64.0), reserve=32.0, max_keys=4096)
    assert sum(fair.take("one", clock.now()) for _ in range(100)) == 8
    clock.advance(2.0)
    assert sum(fair.take("one", clock.now()) for _ in range(100)) == 1
    # a crowd of first-time keys takes the whole shared burst and no more
    assert sum(fair.take(f"k{i}", clock.now()) for i in range(200)) == 63  # 64 less the one above


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

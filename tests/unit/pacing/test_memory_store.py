"""MemoryStore under a fake clock: exact token bucket arithmetic, expiry, and bounded memory."""

from __future__ import annotations

import pytest

from meshgate.pacing.memory_store import MemoryStore
from meshgate.pacing.store import Charge, StoreUnavailable

DAY = (0, 86_400)


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def charge(budget: str, limit: int, amount: int, window: tuple[int, int] = DAY) -> Charge:
    return Charge(budget, limit, amount, *window)


async def test_token_bucket_arithmetic() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    for i in range(10):  # 10 per 60 s: one token every 6 s
        d = await store.hit("k", 10, 60)
        assert d.allowed and d.remaining == 9 - i
    d = await store.hit("k", 10, 60)
    assert not d.allowed and d.reset_s == pytest.approx(6.0)
    clock.now += 5.999
    assert not (await store.hit("k", 10, 60)).allowed
    clock.now += 0.001
    d = await store.hit("k", 10, 60)
    assert d.allowed and d.remaining == 0 and d.reset_s == pytest.approx(60.0)
    clock.now += 30  # 5 tokens back
    d = await store.hit("k", 10, 60)
    assert d.allowed and d.remaining == 4 and d.reset_s == pytest.approx(36.0)
    clock.now += 1_000  # never more than the capacity
    assert (await store.hit("k", 10, 60)).remaining == 9


async def test_full_buckets_are_forgotten() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    for i in range(1_000):
        await store.hit(f"k{i}", 10, 60)
    assert store.sizes()[0] == 1_000
    clock.now += 5.9  # not full yet: one token takes 6 s
    await store.hit("other", 10, 60)
    assert store.sizes()[0] == 1_001
    clock.now += 0.2
    await store.hit("other", 10, 60)
    assert store.sizes()[0] == 1  # only the bucket still missing a token
    clock.now += 12
    await store.budgets()
    assert store.sizes()[0] == 0


async def test_reservations_expire_exactly_and_are_charged_in_full() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    await store.reserve("r1", [charge("b", 10, 4)], 30)
    await store.reserve("r2", [charge("b", 10, 3)], 60)
    clock.now += 29.999
    (s,) = await store.budgets()
    assert (s.spent, s.reserved) == (0, 7)
    clock.now += 0.001
    (s,) = await store.budgets()
    assert (s.spent, s.reserved) == (4, 3)
    await store.settle("r1", {"b": 0})  # expired: nothing
    await store.settle("r2", {"b": 1})
    (s,) = await store.budgets()
    assert (s.spent, s.reserved) == (5, 0)
    clock.now += 60  # the settled record is kept for its ttl, then dropped
    await store.budgets()
    assert store.sizes()[2] == 0


async def test_windows_are_dropped_after_their_end_plus_margin() -> None:
    clock = Clock(now=100.0)
    store = MemoryStore(clock, window_margin_s=50)
    await store.reserve("r", [charge("b", 10, 1, (0, 200))], 10)
    clock.now = 249.9
    await store.budgets()
    assert store.sizes()[1] == 1
    clock.now = 250.0
    await store.budgets()
    assert store.sizes()[1] == 0


async def test_caps_refuse_growth_instead_of_growing() -> None:
    clock = Clock()
    store = MemoryStore(clock, max_buckets=2, max_windows=2, max_reservations=3)
    await store.hit("a", 1, 60)
    await store.hit("b", 1, 60)
    with pytest.raises(StoreUnavailable):
        await store.hit("c", 1, 60)
    await store.reserve("r1", [charge("x", 10, 1), charge("y", 10, 1)], 60)
    with pytest.raises(StoreUnavailable):
        await store.reserve("r2", [charge("z", 10, 1)], 60)
    assert (await store.reserve("r3", [charge("x", 10, 1)], 60)).admitted  # existing window
    await store.reserve("r4", [charge("x", 1, 1)], 60)  # refused, still remembered
    with pytest.raises(StoreUnavailable):
        await store.reserve("r5", [charge("x", 10, 1)], 60)
    clock.now += 61  # expired: room again
    assert (await store.reserve("r5", [charge("x", 10, 1)], 60)).admitted


async def test_a_budget_named_twice_asks_for_the_sum() -> None:
    store = MemoryStore(Clock())
    answer = await store.reserve("r", [charge("b", 10, 6), charge("b", 10, 5)], 60)
    assert not answer.admitted and answer.refused == "b"
    answer = await store.reserve("r2", [charge("b", 10, 6), charge("b", 10, 4)], 60)
    assert answer.admitted and [(s.budget, s.reserved) for s in answer.states] == [("b", 10)]

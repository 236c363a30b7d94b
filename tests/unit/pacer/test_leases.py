"""Global limits decided from leased tokens: never more than the shared bucket, few store calls."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pacer_twins import FlakyStore

from meshgate.pacer import leases
from meshgate.pacer.leases import LeasedLimits
from meshgate.pacing.memory_store import MemoryStore
from meshgate.pacing.spec import GlobalLimit
from meshgate.pacing.store import StoreUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(MemoryStore):
    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.calls = 0

    async def hit(self, key: str, requests: int, per_seconds: int, want: int = 1):  # type: ignore[no-untyped-def]
        self.calls += 1
        return await super().hit(key, requests, per_seconds, want)


async def decide(replica: LeasedLimits, limit: GlobalLimit) -> bool:
    v = replica.try_now(limit)
    if v is None:
        v = await replica.hit(limit)
    return v.allowed


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 400),
    replicas=st.integers(1, 4),
    order=st.lists(st.integers(0, 3), min_size=1, max_size=1500),
)
def test_replicas_together_admit_exactly_the_bucket(
    capacity: int, replicas: int, order: list[int]
) -> None:
    """With no refill and no lease expiring, every token is admitted once and only once,
    whichever replica the requests reach (requests keep arriving until all are refused)."""

    async def run() -> None:
        clock = Clock()
        store = CountingStore(clock)
        pacers = [LeasedLimits(store, 1.0, clock) for _ in range(replicas)]
        limit = GlobalLimit("a/d/0", capacity, 10**9)
        admitted = 0
        for i in order:
            admitted += await decide(pacers[i % replicas], limit)
        assert admitted <= capacity
        for p in pacers:  # drain: each replica spends what it leased, then is refused
            while await decide(p, limit):
                admitted += 1
        assert admitted == capacity

    asyncio.run(run())


async def test_a_busy_limit_costs_far_fewer_store_calls_than_requests() -> None:
    clock = Clock()
    store = CountingStore(clock)
    pacer = LeasedLimits(store, 1.0, clock)
    limit = GlobalLimit("a/d/0", 10**8, 60)
    for _ in range(20_000):  # 2,000 requests/s for 10 s
        clock.now += 0.0005
        assert await decide(pacer, limit)
    assert store.calls < 20_000 / 20, store.calls


async def test_near_exhaustion_leases_shrink_to_one_token() -> None:
    clock = Clock()
    store = CountingStore(clock)
    a, b = LeasedLimits(store, 1.0, clock), LeasedLimits(store, 1.0, clock)
    limit = GlobalLimit("a/d/0", 600, 60)
    admitted = 0
    for i in range(3000):  # a burst across both replicas, 0.2 ms apart
        clock.now += 0.0002
        admitted += await decide((a, b)[i % 2], limit)
    refill = 3000 * 0.0002 * 10  # 10 tokens/s over the burst
    assert 600 <= admitted <= 600 + refill + 1
    assert a.try_now(limit) is not None and not a.try_now(limit).allowed  # type: ignore[union-attr]


async def test_an_empty_bucket_refuses_without_store_calls_until_a_token_is_back() -> None:
    clock = Clock()
    store = CountingStore(clock)
    pacer = LeasedLimits(store, 1.0, clock)
    limit = GlobalLimit("a/d/0", 1, 10)  # one token per 10 s
    assert await decide(pacer, limit)
    assert not await decide(pacer, limit)
    calls = store.calls
    for _ in range(100):
        clock.now += 0.01
        assert not await decide(pacer, limit)
    assert store.calls == calls
    clock.now += 10
    assert await decide(pacer, limit)


async def test_leased_tokens_are_not_spent_after_the_lease_ends() -> None:
    clock = Clock()
    store = CountingStore(clock)
    pacer = LeasedLimits(store, 1.0, clock)
    limit = GlobalLimit("a/d/0", 10**6, 60)
    for _ in range(1000):
        clock.now += 0.001
        await decide(pacer, limit)
    clock.now += leases.TTL_S + 0.01
    assert pacer.try_now(limit) is None  # the lease ended: the next request asks the store


async def test_concurrent_requests_share_one_store_call() -> None:
    clock = Clock()
    store = CountingStore(clock)
    pacer = LeasedLimits(store, 1.0, clock)
    limit = GlobalLimit("a/d/0", 1000, 60)
    results = await asyncio.gather(*(pacer.hit(limit) for _ in range(40)))
    assert all(v.allowed for v in results)
    assert store.calls <= 3, store.calls


async def test_a_store_failure_reaches_every_waiting_request() -> None:
    store = FlakyStore()
    store.down = True
    pacer = LeasedLimits(store, 1.0)
    limit = GlobalLimit("a/d/0", 1000, 60)
    results = await asyncio.gather(*(pacer.hit(limit) for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    store.down = False
    assert (await pacer.hit(limit)).allowed  # recovers with the store


async def test_a_slow_store_times_out() -> None:
    store = FlakyStore()
    store.delay = 1.0
    pacer = LeasedLimits(store, 0.05)
    with pytest.raises(TimeoutError):
        await pacer.hit(GlobalLimit("a/d/0", 1000, 60))


async def test_idle_leases_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    pacer = LeasedLimits(MemoryStore(clock=clock), 1.0, clock)
    for i in range(50):
        await pacer.hit(GlobalLimit(f"a/d/{i}", 10, 60))
    clock.now += leases.IDLE_S + 1
    await pacer.hit(GlobalLimit("b/d/0", 10, 60))
    assert len(pacer._leases) == 1


def test_remaining_never_goes_below_zero_or_above_the_limit() -> None:
    async def run() -> None:
        clock = Clock()
        pacer = LeasedLimits(MemoryStore(clock=clock), 1.0, clock)
        limit = GlobalLimit("a/d/0", 50, 60)
        rng = random.Random(7)
        for _ in range(500):
            clock.now += rng.random() * 0.2
            v = pacer.try_now(limit) or await pacer.hit(limit)
            assert 0 <= v.remaining <= 50

    asyncio.run(run())

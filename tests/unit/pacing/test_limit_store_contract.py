"""The LimitStore contract, for every store (conftest.backend: memory, redis, remote).

Time here is real (Redis takes its own): durations are short and bounds allow for a loaded
machine. MemoryStore's exact arithmetic under a fake clock is in test_memory_store.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from store_backends import Backend

from meshgate.pacing.spec import window_bounds
from meshgate.pacing.store import BudgetState, Charge, LimitStore


def charge(budget: str, limit: int, amount: int, window: tuple[int, int] | None = None) -> Charge:
    start, end = window if window is not None else window_bounds("day", time.time())
    return Charge(budget, limit, amount, start, end)


async def state(store: LimitStore, budget: str) -> BudgetState:
    (found,) = [s for s in await store.budgets(budget) if s.budget == budget]
    return found


def rid() -> str:
    return uuid.uuid4().hex


async def test_bucket_allows_exactly_its_capacity(backend: Backend) -> None:
    store = await backend.client()
    decisions = [await store.hit("agent/a/0", 100, 3600) for _ in range(130)]
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 100
    assert all(d.allowed for d in decisions[:100])  # refused only once empty
    assert [d.remaining for d in allowed[:3]] == [99, 98, 97]
    assert allowed[-1].remaining == 0
    assert all(d.limit == 100 for d in decisions)
    # one token comes back every 36 s: full again in ~36 s after the first, retry after ~36 s
    assert 35.0 < allowed[0].reset_s <= 36.01
    refused = decisions[-1]
    assert not refused.allowed and refused.remaining == 0
    assert 30.0 < refused.reset_s <= 36.01


async def test_bucket_refills_at_its_rate(backend: Backend) -> None:
    store = await backend.client()
    for _ in range(20):
        assert (await store.hit("k", 20, 1)).allowed  # 20 per second
    drained = time.monotonic()
    await asyncio.sleep(0.5)
    allowed = 0
    while (await store.hit("k", 20, 1)).allowed:
        allowed += 1
        assert allowed < 100
    elapsed = time.monotonic() - drained
    # refilled ~10 in 0.5 s, plus what came back during the drain and the burst itself
    assert 9 <= allowed <= 20 * elapsed + 2


async def test_buckets_are_separate(backend: Backend) -> None:
    store = await backend.client()
    assert [(await store.hit("one", 1, 60)).allowed for _ in range(2)] == [True, False]
    assert (await store.hit("two", 1, 60)).allowed


async def test_reserve_holds_all_or_nothing(backend: Backend) -> None:
    store = await backend.client()
    a, b = f"agent/{rid()}/a", f"agent/{rid()}/b"
    first = await store.reserve(rid(), [charge(a, 10, 4), charge(b, 5, 4)], 60)
    assert first.admitted and first.refused is None
    assert [(s.budget, s.spent, s.reserved, s.limit) for s in first.states] == [
        (a, 0, 4, 10),
        (b, 0, 4, 5),
    ]
    refused = await store.reserve(rid(), [charge(a, 10, 4), charge(b, 5, 2)], 60)
    assert not refused.admitted and refused.refused == b
    assert [(s.spent, s.reserved) for s in refused.states] == [(0, 4), (0, 4)]
    assert (await state(store, a)).reserved == 4  # nothing of the refused one is held
    # the first budget that goes over is named
    both = await store.reserve(rid(), [charge(a, 10, 7), charge(b, 5, 2)], 60)
    assert both.refused == a
    fits = await store.reserve(rid(), [charge(a, 10, 6), charge(b, 5, 1)], 60)
    assert fits.admitted
    assert (await state(store, a)).reserved == 10 and (await state(store, b)).reserved == 5


async def test_amount_above_the_limit_is_refused_on_an_empty_budget(backend: Backend) -> None:
    store = await backend.client()
    a = f"agent/{rid()}/a"
    answer = await store.reserve(rid(), [charge(a, 10, 11)], 60)
    assert not answer.admitted and answer.refused == a
    assert (await store.reserve(rid(), [charge(a, 10, 10)], 60)).admitted


async def test_reserve_is_idempotent(backend: Backend) -> None:
    store = await backend.client()
    a = f"agent/{rid()}/a"
    r = rid()
    first = await store.reserve(r, [charge(a, 10, 6)], 60)
    again = await store.reserve(r, [charge(a, 10, 6)], 60)
    other = await store.reserve(r, [charge(a, 10, 1)], 60)  # same id: the first answer
    assert first.admitted and again == first and other == first
    assert (await state(store, a)).reserved == 6
    # a refused id stays refused, even once the budget has room
    refused_id = rid()
    refused = await store.reserve(refused_id, [charge(a, 10, 5)], 60)
    assert not refused.admitted
    await store.settle(r, {a: 0})
    assert await store.reserve(refused_id, [charge(a, 10, 5)], 60) == refused
    # and a settled id is not reserved again
    assert await store.reserve(r, [charge(a, 10, 6)], 60) == first
    assert (await state(store, a)).reserved == 0


async def test_settle_charges_actual_or_reserved_once(backend: Backend) -> None:
    store = await backend.client()
    a, b = f"agent/{rid()}/a", f"agent/{rid()}/b"
    r1 = rid()
    await store.reserve(r1, [charge(a, 1000, 100)], 60)
    await store.settle(r1, {a: 30})
    assert ((s := await state(store, a)).spent, s.reserved) == (30, 0)
    await store.settle(r1, {a: 500})  # twice: nothing changes
    assert (await state(store, a)).spent == 30
    r2 = rid()
    await store.reserve(r2, [charge(a, 1000, 100), charge(b, 1000, 50)], 60)
    await store.settle(r2, {a: 120})  # above what was reserved: charged; b absent: reserved
    assert ((s := await state(store, a)).spent, s.reserved) == (150, 0)
    assert ((s := await state(store, b)).spent, s.reserved) == (50, 0)
    await store.settle(rid(), {a: 1})  # unknown: nothing
    assert (await state(store, a)).spent == 150
    # what was spent counts against later reservations
    assert not (await store.reserve(rid(), [charge(a, 1000, 851)], 60)).admitted
    assert (await store.reserve(rid(), [charge(a, 1000, 850)], 60)).admitted


async def test_unsettled_reservation_is_charged_in_full_when_it_expires(
    backend: Backend,
) -> None:
    store = await backend.client()
    a = f"agent/{rid()}/a"
    r = rid()
    assert (await store.reserve(r, [charge(a, 10, 7)], 0.3)).admitted
    assert ((s := await state(store, a)).spent, s.reserved) == (0, 7)
    await asyncio.sleep(0.6)
    assert ((s := await state(store, a)).spent, s.reserved) == (7, 0)
    await store.settle(r, {a: 1})  # too late: changes nothing
    assert ((s := await state(store, a)).spent, s.reserved) == (7, 0)
    assert not (await store.reserve(rid(), [charge(a, 10, 4)], 60)).admitted


async def test_windows_roll_over(backend: Backend) -> None:
    store = await backend.client()
    a = f"agent/{rid()}/a"
    now = time.time()
    this = window_bounds("hour", now)
    previous = window_bounds("hour", this[0] - 1)
    following = window_bounds("hour", this[1])
    assert (await store.reserve(rid(), [charge(a, 5, 5, previous)], 60)).admitted
    assert (await store.reserve(rid(), [charge(a, 5, 5, this)], 60)).admitted
    assert not (await store.reserve(rid(), [charge(a, 5, 1, this)], 60)).admitted
    assert (await store.reserve(rid(), [charge(a, 5, 5, following)], 60)).admitted
    listed = await store.budgets(a)
    assert [(s.window_start, s.window_end, s.reserved) for s in listed] == [(*this, 5)]


async def test_budgets_lists_current_windows_by_prefix(backend: Backend) -> None:
    store = await backend.client()
    agent = rid()
    ids = [f"agent/{agent}/daily", f"agent/{agent}/hourly", f"group/{agent}/daily"]
    now = time.time()
    await store.reserve(rid(), [charge(ids[1], 9, 2, window_bounds("hour", now))], 60)
    await store.reserve(rid(), [charge(ids[0], 8, 1), charge(ids[2], 7, 3)], 60)
    listed = await store.budgets(f"agent/{agent}/")
    assert [(s.budget, s.limit, s.reserved) for s in listed] == [
        (ids[0], 8, 1),
        (ids[1], 9, 2),
    ]
    assert (listed[1].window_start, listed[1].window_end) == window_bounds("hour", now)
    everything = {s.budget for s in await store.budgets()}
    assert set(ids) <= everything


async def test_concurrent_reserves_never_admit_more_than_the_limit(backend: Backend) -> None:
    stores = [await backend.client(max_in_flight=256) for _ in range(2)]  # two gateways
    a = f"agent/{rid()}/a"

    async def one(i: int) -> bool:
        answer = await stores[i % 2].reserve(rid(), [charge(a, 50, 1)], 60)
        return answer.admitted

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert sum(results) == 50
    assert ((s := await state(stores[0], a)).reserved, s.spent) == (50, 0)


async def test_concurrent_hits_never_allow_more_than_the_bucket(backend: Backend) -> None:
    stores = [await backend.client(max_in_flight=256) for _ in range(2)]
    key = f"rule/{rid()}"
    results = await asyncio.gather(*(stores[i % 2].hit(key, 100, 3600) for i in range(300)))
    assert sum(d.allowed for d in results) == 100


async def test_bad_input_is_refused_before_any_change(backend: Backend) -> None:
    store = await backend.client()
    a = f"agent/{rid()}/a"
    with pytest.raises(ValueError):
        await store.reserve("", [charge(a, 10, 1)], 60)
    with pytest.raises(ValueError):
        await store.reserve(rid(), [charge(a, 10, -1)], 60)
    with pytest.raises(ValueError):
        await store.reserve(rid(), [charge(a, 10, 1)], 0)
    with pytest.raises(ValueError):
        await store.hit("k", 0, 60)
    assert await store.budgets(a) == []


async def test_a_dead_gateways_reservation_is_charged_by_the_store(backend: Backend) -> None:
    """A gateway that dies mid-request never settles; whoever uses the store next sees the
    reservation charged in full once its ttl has passed."""
    dying, other = await backend.client(), await backend.client()
    a = f"agent/{rid()}/a"
    assert (await dying.reserve(rid(), [charge(a, 10, 6)], 0.3)).admitted
    await dying.close()
    await asyncio.sleep(0.6)
    assert ((s := await state(other, a)).spent, s.reserved) == (6, 0)
    assert not (await other.reserve(rid(), [charge(a, 10, 5)], 60)).admitted


async def test_a_shared_bucket_admits_capacity_plus_refill_from_two_gateways(
    backend: Backend,
) -> None:
    """50 per second shared by two gateways hitting it as fast as they can for ~1.5 s: the
    burst plus what refilled meanwhile, within a token or two."""
    stores = [await backend.client(max_in_flight=64) for _ in range(2)]
    key = f"rule/{rid()}"
    allowed = 0
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def hammer(store: LimitStore) -> None:
        nonlocal allowed
        while loop.time() - start < 1.5:
            if (await store.hit(key, 50, 1)).allowed:
                allowed += 1

    await asyncio.gather(*(hammer(stores[i % 2]) for i in range(8)))
    elapsed = loop.time() - start
    assert allowed <= 50 + 50 * elapsed + 2
    assert allowed >= 50 + 50 * 1.5 - 5  # the hammering outlasted 1.5 s of refill

"""Concurrency properties, for every store (conftest.backend), two clients ("gateways") at once:
whatever the amounts and the interleaving, the held total never passes the limit, and every
refusal was for an amount that did not fit."""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_backends import Backend

from meshgate.pacing.store import Charge, Reservation

WINDOW = (0, 2**40)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # fresh budget per example
)
@given(
    limit=st.integers(1, 200),
    amounts=st.lists(st.integers(0, 40), min_size=1, max_size=60),
)
async def test_concurrent_reserves_never_overshoot(
    backend: Backend, limit: int, amounts: list[int]
) -> None:
    stores = [await backend.client(max_in_flight=256) for _ in range(2)]
    budget = f"agent/{uuid.uuid4().hex}/daily"

    async def one(i: int, amount: int) -> Reservation:
        charge = Charge(budget, limit, amount, *WINDOW)
        return await stores[i % 2].reserve(uuid.uuid4().hex, [charge], 60)

    answers = await asyncio.gather(*(one(i, a) for i, a in enumerate(amounts)))
    held = sum(a for a, r in zip(amounts, answers, strict=True) if r.admitted)
    assert held <= limit
    for amount, answer in zip(amounts, answers, strict=True):
        if not answer.admitted:  # only ever added to: what did not fit then does not fit now
            assert answer.refused == budget and held + amount > limit
    states = [s for s in await stores[0].budgets(budget) if s.budget == budget]
    assert sum(s.reserved for s in states) == held


async def test_settling_while_reserving_never_overshoots(backend: Backend) -> None:
    """Reserve 10, settle at 3..12 (sometimes above the reservation), 400 times from two
    gateways against 1,000: every settle counted once, and spend passes the limit by no more
    than what providers reported above the reservations."""
    stores = [await backend.client(max_in_flight=256) for _ in range(2)]
    budget = f"agent/{uuid.uuid4().hex}/daily"
    over = charged = 0

    async def one(i: int) -> None:
        nonlocal over, charged
        store = stores[i % 2]
        rid = uuid.uuid4().hex
        answer = await store.reserve(rid, [Charge(budget, 1000, 10, *WINDOW)], 60)
        if answer.admitted:
            actual = 3 + i % 10
            over += max(0, actual - 10)
            await store.settle(rid, {budget: actual})
            charged += actual

    await asyncio.gather(*(one(i) for i in range(400)))
    (state,) = [s for s in await stores[1].budgets(budget) if s.budget == budget]
    assert state.reserved == 0
    assert state.spent == charged  # every settle applied once, exactly
    assert state.spent <= 1000 + over

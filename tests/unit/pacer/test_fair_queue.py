"""The in-flight limiter: the cap holds, waits are bounded, fairness, no leaked slot."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.pacer.fair_queue import Limiter, Slot
from meshgate.pacing.spec import ConcurrencySpec


def cap(
    max_: int = 1, fair: bool = True, capacity: bool = False, key: str = "k"
) -> ConcurrencySpec:
    return ConcurrencySpec(key, max_, 10_000, fair, capacity)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_admits_up_to_max_then_waits_then_times_out() -> None:
    lim = Limiter()
    a = await lim.acquire(cap(2), "a", 1)
    b = await lim.acquire(cap(2), "a", 1)
    assert a is not None and b is not None
    assert await lim.acquire(cap(2), "a", 0.05) is None
    assert lim.waiting("k") == 0 and lim.in_flight("k") == 2
    a.release()
    a.release()  # idempotent
    assert lim.in_flight("k") == 1
    b.release()
    assert lim.keys() == 0  # idle keys are forgotten


async def test_release_hands_the_slot_to_the_first_waiter() -> None:
    lim = Limiter()
    held = await lim.acquire(cap(), "a", 1)
    assert held is not None
    waiter = asyncio.create_task(lim.acquire(cap(), "b", 5))
    await settle()
    assert lim.waiting("k") == 1
    # a newcomer cannot jump the queue while someone waits
    assert await lim.acquire(cap(), "c", 0) is None
    held.release()
    got = await waiter
    assert isinstance(got, Slot) and lim.in_flight("k") == 1 and lim.waiting("k") == 0


async def test_fair_b_is_admitted_within_two_releases_behind_a_flood() -> None:
    lim = Limiter()
    held = await lim.acquire(cap(), "a", 1)
    assert held is not None
    order: list[str] = []

    async def one(agent: str) -> None:
        slot = await lim.acquire(cap(), agent, 30)
        assert slot is not None
        order.append(agent)
        await release_gate[agent].wait()
        slot.release()

    release_gate = {"a": asyncio.Event(), "b": asyncio.Event()}
    flood = [asyncio.create_task(one("a")) for _ in range(100)]
    await settle()
    b = asyncio.create_task(one("b"))
    await settle()
    assert lim.waiting("k") == 101
    assert (lim.waiting_of("k", "a"), lim.waiting_of("k", "b")) == (100, 1)
    release_gate["a"].set()
    release_gate["b"].set()
    held.release()  # release 1
    while len(order) < 3:
        await asyncio.sleep(0)
    assert "b" in order[:2], order
    await asyncio.gather(*flood, b)
    assert lim.keys() == 0


async def test_unfair_is_fifo() -> None:
    lim = Limiter()
    held = await lim.acquire(cap(fair=False), "a", 1)
    assert held is not None
    order: list[str] = []

    async def one(agent: str) -> None:
        slot = await lim.acquire(cap(fair=False), agent, 30)
        assert slot is not None
        order.append(agent)
        slot.release()

    tasks = [asyncio.create_task(one("a")) for _ in range(5)]
    await settle()
    tasks.append(asyncio.create_task(one("b")))
    await settle()
    held.release()
    await asyncio.gather(*tasks)
    assert order == ["a"] * 5 + ["b"]


async def test_cancelled_waiter_leaks_nothing_even_when_granted_at_once() -> None:
    lim = Limiter()
    held = await lim.acquire(cap(), "a", 1)
    assert held is not None
    waiter = asyncio.create_task(lim.acquire(cap(), "b", 5))
    other = asyncio.create_task(lim.acquire(cap(), "c", 5))
    await settle()
    held.release()  # grants `waiter`'s future...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    slot = await other  # the slot was passed on, not lost
    assert slot is not None and lim.in_flight("k") == 1
    slot.release()
    assert lim.keys() == 0


@pytest.mark.parametrize("fair", [True, False])
async def test_waiters_cancelled_together_leak_nothing(fair: bool) -> None:
    """Every request going away at once (a client closing all its connections): the first
    waiter is granted the released slot, and all are cancelled before any runs, so the
    release its handler passes on meets futures already cancelled. Found by
    benchmarks/pacing.py, whose flooding agent starved for good after its first flood."""
    lim = Limiter()
    held = await lim.acquire(cap(fair=fair), "a", 1)
    assert held is not None
    waiters = [asyncio.create_task(lim.acquire(cap(fair=fair), "a", 5)) for _ in range(8)]
    await settle()
    held.release()
    for w in waiters:
        w.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    assert (lim.in_flight("k"), lim.waiting("k"), lim.keys()) == (0, 0, 0)
    again = await lim.acquire(cap(fair=fair), "a", 0)  # the agent is served again at once
    assert again is not None


async def test_capacity_waiting_counts_only_capacity_keys() -> None:
    lim = Limiter()
    gw = cap(1, capacity=True, key="gateway")
    dest = cap(1, key="dest")
    assert await lim.acquire(gw, "a", 1) is not None
    assert await lim.acquire(dest, "a", 1) is not None
    tasks = [asyncio.create_task(lim.acquire(gw, "a", 0.2)) for _ in range(3)]
    tasks += [asyncio.create_task(lim.acquire(dest, "b", 0.2)) for _ in range(2)]
    await settle()
    assert lim.capacity_waiting() == 3
    assert lim.waiting_by_key() == {"gateway": 3, "dest": 2}
    assert await asyncio.gather(*tasks) == [None] * 5
    assert lim.capacity_waiting() == 0 and lim.waiting_by_key() == {}


async def test_a_larger_max_admits_waiters() -> None:
    lim = Limiter()
    assert await lim.acquire(cap(1), "a", 1) is not None
    waiter = asyncio.create_task(lim.acquire(cap(1), "b", 5))
    await settle()
    assert await lim.acquire(cap(3), "c", 0) is not None  # policy raised the cap
    assert await waiter is not None
    assert lim.in_flight("k") == 3


ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "release", "cancel", "tick"]),
        st.integers(0, 3),  # agent, or index of a held slot / waiter
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(max_=st.integers(1, 3), fair=st.booleans(), script=ops)
def test_never_more_than_max_in_flight_and_nothing_leaks(
    max_: int, fair: bool, script: list[tuple[str, int]]
) -> None:
    async def run() -> None:
        lim = Limiter()
        spec = cap(max_, fair)
        held: list[Slot] = []
        waiters: list[asyncio.Task[Slot | None]] = []

        def check() -> None:
            assert lim.in_flight("k") <= max_
            for t in [t for t in waiters if t.done()]:
                waiters.remove(t)
                if not t.cancelled() and t.result() is not None:
                    held.append(t.result())  # type: ignore[arg-type]
            assert lim.in_flight("k") == len(held)
            assert lim.waiting("k") == len(waiters)

        for op, n in script:
            if op == "acquire":
                waiters.append(asyncio.create_task(lim.acquire(spec, f"a{n}", 0.01 * (n + 1))))
            elif op == "release" and held:
                held.pop(n % len(held)).release()
            elif op == "cancel" and waiters:
                waiters[n % len(waiters)].cancel()
            elif op == "tick":
                await asyncio.sleep(0.005)
            await settle()
            check()
        while waiters:
            await asyncio.sleep(0.01)
            check()
        for s in held:
            s.release()
        assert lim.keys() == 0

    asyncio.run(run())


async def test_a_flood_beyond_the_waiting_cap_is_refused_at_once_others_still_queue() -> None:
    lim = Limiter(max_waiting=3)
    held = await lim.acquire(cap(), "a", 1)
    assert held is not None
    flood = [asyncio.create_task(lim.acquire(cap(), "a", 5)) for _ in range(3)]
    await settle()
    started = asyncio.get_running_loop().time()
    assert await lim.acquire(cap(), "a", 5) is None  # the fourth: no wait at all
    assert asyncio.get_running_loop().time() - started < 1
    other = asyncio.create_task(lim.acquire(cap(), "b", 5))
    await settle()
    assert lim.waiting_of("k", "b") == 1
    held.release()
    for waiter in (flood[0], other, *flood[1:]):  # round-robin: b right after a's first
        slot = await asyncio.wait_for(waiter, 1)
        assert slot is not None
        slot.release()
    assert lim.keys() == 0

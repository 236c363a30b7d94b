"""StoreGuard and CircuitBreaker with a fake clock and fake calls."""

from __future__ import annotations

import asyncio

import pytest

from meshgate.pacing.breaker import CircuitBreaker, StoreGuard
from meshgate.pacing.store import StoreUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Down(Exception):
    pass


async def drained(g: StoreGuard) -> None:
    """Wait for the calls the guard let go of (their clean-up runs after the caller left)."""
    for _ in range(100):
        if g.in_flight == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{g.in_flight} calls still in flight")


def guard(clock: Clock, **options: float) -> StoreGuard:
    breaker = CircuitBreaker(failures=3, interval_s=1.0, clock=clock)
    return StoreGuard("test store", (Down,), breaker=breaker, **options)  # type: ignore[arg-type]


async def test_opens_after_consecutive_failures_and_probes_once_per_interval() -> None:
    clock = Clock()
    g = guard(clock)
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        raise Down("refused")

    async def working() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    for _ in range(3):
        with pytest.raises(StoreUnavailable, match="refused"):
            await g.call(failing)
    assert g.breaker.open and calls == 3
    for _ in range(10):  # open: nothing reaches the store
        with pytest.raises(StoreUnavailable, match="circuit open"):
            await g.call(working)
    assert calls == 3
    clock.now = 1.0  # one probe; it fails: open for another interval
    with pytest.raises(StoreUnavailable, match="refused"):
        await g.call(failing)
    assert calls == 4
    with pytest.raises(StoreUnavailable, match="circuit open"):
        await g.call(working)
    clock.now = 2.0
    assert await g.call(working) == "ok"  # the probe succeeds: closed
    assert not g.breaker.open
    assert await g.call(working) == "ok"
    assert calls == 6


async def test_only_one_probe_at_a_time() -> None:
    clock = Clock()
    g = guard(clock, timeout_s=5.0)
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "ok"

    async def failing() -> None:
        raise Down("x")

    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            await g.call(failing)
    clock.now = 1.5
    probe = asyncio.create_task(g.call(slow))
    await asyncio.sleep(0)
    with pytest.raises(StoreUnavailable, match="circuit open"):
        await g.call(slow)
    release.set()
    assert await probe == "ok"
    assert await g.call(slow) == "ok"


async def test_timeout_bounds_each_call() -> None:
    g = guard(Clock(), timeout_s=0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(StoreUnavailable, match="no answer within 50 ms"):
        await g.call(lambda: asyncio.sleep(10))
    assert loop.time() - start < 0.5
    assert g.breaker.failures == 1
    await drained(g)


async def test_the_caller_leaves_at_the_timeout_even_if_clean_up_is_slow() -> None:
    g = guard(Clock(), timeout_s=0.05, max_in_flight=1)
    cleaned = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        finally:  # like a client closing its connection after a cancel
            await asyncio.shield(asyncio.sleep(0.3))
            cleaned.set()

    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(StoreUnavailable):
        await g.call(stubborn)
    assert loop.time() - start < 0.2
    with pytest.raises(StoreUnavailable, match="1 calls already in flight"):
        await g.call(stubborn)  # its slot is still taken until the clean-up ends
    await cleaned.wait()
    await drained(g)


async def test_calls_beyond_the_cap_fail_at_once() -> None:
    g = guard(Clock(), timeout_s=5.0, max_in_flight=4)
    release = asyncio.Event()
    held = [asyncio.create_task(g.call(release.wait)) for _ in range(4)]
    await asyncio.sleep(0)
    assert g.in_flight == 4
    with pytest.raises(StoreUnavailable, match="4 calls already in flight"):
        await g.call(release.wait)
    assert g.breaker.failures == 0  # shedding load says nothing about the store
    release.set()
    await asyncio.gather(*held)
    assert g.in_flight == 0


async def test_cancellation_and_bad_input_do_not_count_as_failures() -> None:
    clock = Clock()
    g = guard(clock, timeout_s=5.0)

    async def bad() -> None:
        raise ValueError("bad input")

    for _ in range(5):
        with pytest.raises(ValueError):
            await g.call(bad)
    task = asyncio.create_task(g.call(lambda: asyncio.sleep(10)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert g.breaker.failures == 0 and not g.breaker.open
    await drained(g)

"""The one retry policy (meshgate.retry): growth, cap, jitter, asyncio sleeps, quiet logs."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from meshgate.retry import Backoff, Outage


def test_equal_jitter_grows_from_base_and_is_capped() -> None:
    backoff = Backoff(0.25, 15.0)
    for failures in range(1, 40):
        ceiling = min(15.0, 0.25 * 2 ** (failures - 1))
        samples = [backoff.delay(failures) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in samples), failures
    assert max(backoff.delay(1) for _ in range(200)) <= 0.25  # the first retry comes quickly
    assert min(backoff.delay(30) for _ in range(200)) >= 7.5  # capped, yet still half of it
    assert backoff.delay(10_000) <= 15.0  # no overflow for a very long outage


def test_delays_are_jittered_not_lockstep() -> None:
    samples = {round(Backoff(1.0, 60.0).delay(4), 6) for _ in range(50)}
    assert len(samples) > 40


def test_full_jitter_spans_zero_to_the_ceiling() -> None:
    backoff = Backoff(1.0, 8.0, jitter="full")
    samples = [backoff.delay(5) for _ in range(500)]
    assert all(0 <= d <= 8.0 for d in samples)
    assert min(samples) < 2.0 and max(samples) > 6.0


def test_base_must_be_positive_and_below_the_cap() -> None:
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)


async def test_until_success_sleeps_with_asyncio_and_reports_each_failure() -> None:
    calls: list[float] = []
    failures: list[tuple[str, float]] = []

    async def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise ConnectionError(f"down {len(calls)}")
        return "up"

    ticks = 0

    async def ticker() -> None:  # runs only if the retry loop yields to the event loop
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    other = asyncio.create_task(ticker())
    try:
        backoff = Backoff(0.1, 0.15)
        result = await backoff.until_success(flaky, lambda e, d: failures.append((str(e), d)))
    finally:
        other.cancel()
    assert result == "up"
    assert [m for m, _ in failures] == ["down 1", "down 2", "down 3"]
    assert 0.05 <= failures[0][1] <= 0.1 and all(0.075 <= d <= 0.15 for _, d in failures[1:])
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(gap >= d - 0.01 for gap, (_, d) in zip(gaps, failures, strict=True))
    assert ticks >= 10  # the loop kept running other tasks while the retries waited


async def test_errors_outside_retry_on_and_cancellation_propagate() -> None:
    async def broken() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await Backoff(0.01, 0.01).until_success(broken, lambda e, d: None, retry_on=(OSError,))

    async def down() -> None:
        raise OSError("down")

    task = asyncio.create_task(Backoff(5.0, 5.0).until_success(down, lambda e, d: None))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_outage_logs_one_warning_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    outage = Outage(logging.getLogger("test.outage"))
    outage.recovered("back")  # nothing was failing: nothing to say
    for i in range(5):
        outage.failed("down %d", i)
    outage.recovered("back")
    outage.failed("down again")
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [m for lvl, m in levels if lvl == "WARNING"] == ["down 0", "down again"]
    assert [m for lvl, m in levels if lvl == "INFO"] == ["back"]
    assert len([m for lvl, m in levels if lvl == "DEBUG"]) == 4


async def test_an_async_failure_callback_is_awaited_before_the_next_try() -> None:
    seen: list[str] = []

    async def flaky() -> int:
        seen.append("try")
        if seen.count("try") < 3:
            raise ConnectionError
        return 7

    async def on_failure(exc: BaseException, delay: float) -> None:
        await asyncio.sleep(0)
        seen.append("refreshed")

    assert await Backoff(0.01, 0.02).until_success(flaky, on_failure) == 7
    assert seen == ["try", "refreshed", "try", "refreshed", "try"]


async def test_a_plain_callable_returning_an_awaitable_is_awaited() -> None:
    calls = 0

    async def flaky(value: int) -> int:
        nonlocal calls
        calls += 1
        if calls < 2:
            raise ConnectionError
        return value

    assert await Backoff(0.01, 0.01).until_success(lambda: flaky(5), lambda e, d: None) == 5
    assert calls == 2

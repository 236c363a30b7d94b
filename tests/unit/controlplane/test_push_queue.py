"""The push queue: FIFO, coalescing, re-queue of a change that lands mid-push, and the bound."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from meshgate.controlplane.push_queue import Pusher, PushQueue

K = TypeVar("K")


def task_pusher(push: Callable[[K], Awaitable[None]], limit: int, **kw: float) -> Pusher[K]:
    """A Pusher whose pushes are coroutines, each reporting done when it returns (the ADS
    streams report from their writer task instead)."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(key: K) -> None:
        try:
            await push(key)
        finally:
            pusher.done(key)

    def start(key: K) -> None:
        task = asyncio.get_running_loop().create_task(run(key))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    pusher: Pusher[K] = Pusher(start, limit, **kw)
    return pusher


def test_queue_is_fifo_and_coalesces_pending_keys() -> None:
    q: PushQueue[str] = PushQueue()
    assert q.enqueue("a", 1.0)
    assert q.enqueue("b", 2.0)
    assert not q.enqueue("a", 3.0)  # already waiting: merged, keeps its first time
    assert q.dequeue() == ("a", 1.0)
    assert q.dequeue() == ("b", 2.0)
    assert q.dequeue() is None
    assert (q.pending, q.in_flight) == (0, 2)


def test_request_during_push_is_requeued_once_after_it() -> None:
    q: PushQueue[str] = PushQueue()
    q.enqueue("a", 1.0)
    q.enqueue("b", 1.5)
    assert q.dequeue() == ("a", 1.0)
    assert q.enqueue("a", 2.0)  # mid-push: remembered
    assert not q.enqueue("a", 3.0)  # and merged with the first mid-push request
    assert q.pending == 1  # only b: a is not pushed twice at once
    q.mark_done("a")
    assert q.dequeue() == ("b", 1.5)
    assert q.dequeue() == ("a", 2.0)  # queued behind b, with the earliest mid-push time
    q.mark_done("a")
    q.mark_done("b")
    assert (q.pending, q.in_flight, q.dequeue()) == (0, 0, None)


def test_discard_forgets_pending_and_mid_push_requests() -> None:
    q: PushQueue[str] = PushQueue()
    q.enqueue("a", 1.0)
    q.enqueue("b", 1.0)
    q.dequeue()
    q.enqueue("a", 2.0)
    q.discard("a")
    q.discard("b")
    q.mark_done("a")
    assert q.dequeue() is None


async def test_pusher_bounds_concurrency_and_pushes_everyone() -> None:
    running = 0
    peak = 0
    done: list[int] = []

    async def push(key: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        done.append(key)

    pusher: Pusher[int] = task_pusher(push, limit=7)
    for key in range(100):
        pusher.request(key)
    assert pusher.queue.in_flight == 7 and pusher.queue.pending == 93
    await asyncio.wait_for(pusher.idle(), 10)
    assert sorted(done) == list(range(100))
    assert done[:7] == list(range(7))  # FIFO
    assert peak == 7 == pusher.max_in_flight
    assert pusher.pushes == 100


async def test_pusher_change_mid_push_is_pushed_again_after_it() -> None:
    started: list[str] = []
    gate = asyncio.Event()

    async def push(key: str) -> None:
        started.append(key)
        if len(started) == 1:
            await gate.wait()

    pusher: Pusher[str] = task_pusher(push, limit=4)
    pusher.request("a")
    await asyncio.sleep(0)
    assert started == ["a"]
    for _ in range(5):  # a burst of changes while a's first push is still running
        pusher.request("a")
    await asyncio.sleep(0.01)
    assert started == ["a"]  # never two pushes of one key at once
    gate.set()
    await asyncio.wait_for(pusher.idle(), 5)
    assert started == ["a", "a"]  # the burst merged into one more push


async def test_pusher_survives_a_failing_start(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []
    pusher: Pusher[str]

    def start(key: str) -> None:
        if key == "bad":
            raise RuntimeError("boom")
        done.append(key)
        pusher.done(key)

    pusher = Pusher(start, limit=1)
    for key in ("bad", "good"):
        pusher.request(key)
    assert done == ["good"]
    assert (pusher.queue.pending, pusher.queue.in_flight, pusher.pushes) == (0, 0, 2)
    assert "push to bad failed" in caplog.text


async def test_pushes_done_at_once_do_not_recurse() -> None:
    """A push with nothing to send reports done from inside start: 10,000 of them in a row
    must be a loop, not 10,000 nested calls."""
    started: list[int] = []
    pusher: Pusher[int]

    def start(key: int) -> None:
        started.append(key)
        pusher.done(key)

    pusher = Pusher(start, limit=1)
    for key in range(10_000):
        pusher.request(key)
    assert started == list(range(10_000))
    assert (pusher.queue.pending, pusher.queue.in_flight, pusher.pushes) == (0, 0, 10_000)


async def test_a_push_too_slow_to_finish_gives_its_slot_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started: list[str] = []
    pusher: Pusher[str] = Pusher(started.append, limit=1, slot_timeout=0.2)
    pusher.request("stuck")  # never reports done in time (its client does not read)
    pusher.request("next")
    assert started == ["stuck"]
    await asyncio.sleep(0.3)
    assert started == ["stuck", "next"]  # the slot was taken back
    assert pusher.expired == 1 and "slow to be taken" in caplog.text
    pusher.done("stuck")  # late: ignored, the slot is next's
    assert pusher.queue.in_flight == 1
    pusher.request("stuck")  # a new change for it: started again once a slot is free
    pusher.done("next")
    assert started == ["stuck", "next", "stuck"]
    pusher.done("stuck")
    assert (pusher.queue.pending, pusher.queue.in_flight, pusher.pushes) == (0, 0, 2)


def test_pusher_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Pusher(lambda key: None, limit=0)


def test_urgent_keys_go_first_and_a_bulk_key_can_be_promoted() -> None:
    q: PushQueue[str] = PushQueue()
    for key in ("bulk1", "bulk2", "bulk3"):
        q.enqueue(key, 1.0)
    assert q.enqueue("small", 2.0, urgent=True)
    assert not q.enqueue("bulk3", 3.0, urgent=True)  # promoted, keeps its first time
    assert [q.dequeue() for _ in range(2)] == [("small", 2.0), ("bulk3", 1.0)]
    assert q.dequeue() == ("bulk1", 1.0)
    q.enqueue("bulk1", 4.0, urgent=True)  # mid-push, urgent: re-queued urgent
    q.enqueue("bulk1", 5.0)
    q.mark_done("bulk1")
    assert q.dequeue() == ("bulk1", 4.0)
    assert q.dequeue() == ("bulk2", 1.0)


async def test_a_small_change_overtakes_a_bulk_wave() -> None:
    order: list[str] = []

    async def push(key: str) -> None:
        await asyncio.sleep(0.001)
        order.append(key)

    pusher: Pusher[str] = task_pusher(push, limit=2)
    for i in range(50):
        pusher.request(f"wave{i}")
    pusher.request("one-agent", urgent=True)
    await asyncio.wait_for(pusher.idle(), 10)
    assert order.index("one-agent") <= 2  # behind at most the two already in flight

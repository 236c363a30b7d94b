"""The push queue: FIFO, coalescing, re-queue of a change that lands mid-push, and the bound."""

from __future__ import annotations

import asyncio

import pytest

from meshgate.controlplane.push_queue import Pusher, PushQueue


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

    pusher: Pusher[int] = Pusher(push, limit=7)
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

    pusher: Pusher[str] = Pusher(push, limit=4)
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


async def test_pusher_survives_a_failing_push(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []

    async def push(key: str) -> None:
        if key == "bad":
            raise RuntimeError("boom")
        done.append(key)

    pusher: Pusher[str] = Pusher(push, limit=1)
    for key in ("bad", "good"):
        pusher.request(key)
    await asyncio.wait_for(pusher.idle(), 5)
    assert done == ["good"]
    assert "push to bad failed" in caplog.text


def test_pusher_limit_must_be_positive() -> None:
    async def push(key: str) -> None:
        return None

    with pytest.raises(ValueError):
        Pusher(push, limit=0)


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

    pusher: Pusher[str] = Pusher(push, limit=2)
    for i in range(50):
        pusher.request(f"wave{i}")
    pusher.request("one-agent", urgent=True)
    await asyncio.wait_for(pusher.idle(), 10)
    assert order.index("one-agent") <= 2  # behind at most the two already in flight

"""Bounded, coalescing pushes to streams (after Istio's `pilot/pkg/xds/pushqueue.go`).

A mesh-wide change wakes every stream at once. Pushing to all of them concurrently would
serialise and hand gRPC thousands of responses in one burst (memory, and every other stream's
latency with it); pushing one at a time would make the last stream wait for all the others.
So a key waits in `pending` (FIFO, once however often it is requested) until one of at most
`limit` push slots is free. A request for a key whose push is in flight is remembered and the
key is queued again once that push is done: the push reads the newest snapshot, so requests
merge, and a change that lands mid-push is never lost. Small changes (a few node groups) go
ahead of bulk ones (a certificate renewal wave, a mesh-wide change), FIFO within each.

`PushQueue` is the bookkeeping alone (no asyncio, tested directly); `Pusher` drives it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

log = logging.getLogger(__name__)


class PushQueue(Generic[K]):
    """Pending keys in FIFO order (urgent ones first), keys being pushed, and keys requested
    while being pushed.

    Each key carries the time it was first requested (merges keep the earliest), so the delay
    from a change to its push can be measured. Urgent keys (small changes) are taken before any
    other pending key, so a one-agent change does not wait behind a renewal wave of thousands;
    a key requested both ways counts as urgent."""

    def __init__(self) -> None:
        self._urgent: dict[K, float] = {}  # insertion order is FIFO order
        self._pending: dict[K, float] = {}
        self._in_flight: set[K] = set()
        self._again: dict[K, tuple[float, bool]] = {}  # requested while in flight

    def enqueue(self, key: K, at: float, urgent: bool = False) -> bool:
        """Request a push of `key`; False if it merged into a request already waiting."""
        if key in self._in_flight:
            prev = self._again.get(key)
            self._again[key] = (prev[0], prev[1] or urgent) if prev else (at, urgent)
            return prev is None
        if key in self._urgent:
            return False
        if key in self._pending:
            if urgent:
                self._urgent[key] = self._pending.pop(key)
            return False
        (self._urgent if urgent else self._pending)[key] = at
        return True

    def dequeue(self) -> tuple[K, float] | None:
        """The oldest urgent key, else the oldest pending key, now in flight; None if none."""
        lane = self._urgent or self._pending
        if not lane:
            return None
        key = next(iter(lane))
        at = lane.pop(key)
        self._in_flight.add(key)
        return key, at

    def mark_done(self, key: K) -> None:
        """The push of `key` finished; a request that arrived meanwhile is queued (at the end)."""
        self._in_flight.discard(key)
        again = self._again.pop(key, None)
        if again is not None:
            (self._urgent if again[1] else self._pending)[key] = again[0]

    def discard(self, key: K) -> None:
        """Forget `key` (its stream closed); an in-flight push still ends with mark_done."""
        self._urgent.pop(key, None)
        self._pending.pop(key, None)
        self._again.pop(key, None)

    @property
    def pending(self) -> int:
        return len(self._urgent) + len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)


class Pusher(Generic[K]):
    """Runs `push(key)` for requested keys, at most `limit` at a time, coalescing repeats.

    A push that raises is logged and its slot freed. `delays` keeps the request-to-start
    delay of recent pushes (seconds), for benchmarks and status."""

    def __init__(
        self,
        push: Callable[[K], Awaitable[None]],
        limit: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._push = push
        self.limit = limit
        self._clock = clock
        self.queue: PushQueue[K] = PushQueue()
        self._tasks: set[asyncio.Task[None]] = set()
        self.pushes = 0
        self.max_in_flight = 0
        self.delays: list[float] = []

    def request(self, key: K, urgent: bool = False) -> None:
        """Ask for a push of `key` (from the event loop's thread; never blocks)."""
        self.queue.enqueue(key, self._clock(), urgent)
        self._fill()

    def discard(self, key: K) -> None:
        self.queue.discard(key)

    def _fill(self) -> None:
        while self.queue.in_flight < self.limit:
            item = self.queue.dequeue()
            if item is None:
                return
            key, at = item
            self.delays.append(self._clock() - at)
            if len(self.delays) > 100_000:
                del self.delays[:50_000]
            self.max_in_flight = max(self.max_in_flight, self.queue.in_flight)
            task = asyncio.get_running_loop().create_task(self._run(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, key: K) -> None:
        try:
            await self._push(key)
        except Exception:  # one key's failure must not stop the others' pushes
            log.exception("push to %s failed", key)
        finally:
            self.pushes += 1
            self.queue.mark_done(key)
        self._fill()  # not reached when cancelled (shutdown): start nothing new then

    async def idle(self) -> None:
        """Wait until nothing is pending or in flight (tests, benchmarks)."""
        while self.queue.pending or self.queue.in_flight:
            await asyncio.sleep(0.001)

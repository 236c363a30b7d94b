"""Bounded, coalescing pushes to streams (after Istio's `pilot/pkg/xds/pushqueue.go`).

A mesh-wide change wakes every stream at once. Pushing to all of them concurrently would
serialise and hand gRPC thousands of responses in one burst (memory, and every other stream's
latency with it); pushing one at a time would make the last stream wait for all the others.
So a key waits in `pending` (FIFO, once however often it is requested) until one of at most
`limit` push slots is free. A request for a key whose push is in flight is remembered and the
key is queued again once that push is done: the push reads the newest snapshot, so requests
merge, and a change that lands mid-push is never lost. Small changes (a few node groups) go
ahead of bulk ones (a certificate renewal wave, a mesh-wide change), FIFO within each.

`PushQueue` is the bookkeeping alone (no asyncio, tested directly); `Pusher` drives it. A push
costs the Pusher no task, future or timer: at 10,000 streams per change those were a large
part of the control plane's CPU, and objects for the collector.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Hashable
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
        # insertion order is FIFO order; OrderedDict pops its first key in O(1), where a dict
        # scans past every key popped before it (10,000 pending keys: 50 million steps)
        self._urgent: collections.OrderedDict[K, float] = collections.OrderedDict()
        self._pending: collections.OrderedDict[K, float] = collections.OrderedDict()
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
        key, at = lane.popitem(last=False)
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
    """Starts pushes of requested keys, at most `limit` unfinished at once, coalescing repeats.

    `start(key)` begins a push and returns at once; the key's owner (the stream, whose own task
    hands the responses to gRPC) calls `done(key)` when it has, possibly from inside `start`.
    A start that raises is logged and its slot freed. A push not done within `slot_timeout`
    seconds gives its slot up (its client does not read, and flow control holds the send): the
    others must not wait for it; a later request for its key starts it again, and its late
    `done` is then ignored. One timer, not one per push, watches for that.
    `delays` keeps the request-to-start delay of recent pushes (seconds), for benchmarks and
    status."""

    def __init__(
        self,
        start: Callable[[K], None],
        limit: int = 100,
        clock: Callable[[], float] = time.monotonic,
        slot_timeout: float = 5.0,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._start = start
        self.limit = limit
        self._clock = clock
        self.slot_timeout = slot_timeout
        self.queue: PushQueue[K] = PushQueue()
        self._started: dict[K, float] = {}  # keys holding a slot, in start order
        self._timer: asyncio.TimerHandle | None = None
        self._filling = False
        self.pushes = 0
        self.expired = 0  # slots taken back from pushes that were too slow
        self.max_in_flight = 0
        self.delays: list[float] = []

    def request(self, key: K, urgent: bool = False) -> None:
        """Ask for a push of `key` (from the event loop's thread; never blocks)."""
        self.queue.enqueue(key, self._clock(), urgent)
        self._fill()

    def discard(self, key: K) -> None:
        self.queue.discard(key)

    def done(self, key: K) -> None:
        """The push of `key` has been handed over: free its slot (if it still holds one)."""
        if self._started.pop(key, None) is None:
            return
        self.pushes += 1
        self.queue.mark_done(key)
        self._fill()

    def _fill(self) -> None:
        if self._filling:  # a start that finished at once: the loop below goes on
            return
        self._filling = True
        try:
            queue = self.queue
            while queue.in_flight < self.limit:
                item = queue.dequeue()
                if item is None:
                    break
                key, at = item
                now = self._clock()
                self.delays.append(now - at)
                if len(self.delays) > 100_000:
                    del self.delays[:50_000]
                self._started[key] = now
                if queue.in_flight > self.max_in_flight:
                    self.max_in_flight = queue.in_flight
                try:
                    self._start(key)
                except Exception:  # one key's failure must not stop the others' pushes
                    log.exception("push to %s failed", key)
                    self.done(key)
        finally:
            self._filling = False
        if self._started and self._timer is None:  # when the oldest unfinished push times out
            oldest = next(iter(self._started.values()))
            delay = max(0.0, oldest + self.slot_timeout - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._clock()
        for key, started in list(self._started.items()):
            if now - started < self.slot_timeout:
                break
            log.warning("push to %s is slow to be taken; freeing its slot", key)
            del self._started[key]
            self.expired += 1
            self.queue.mark_done(key)
        self._fill()

    async def idle(self) -> None:
        """Wait until nothing is pending or in flight (tests, benchmarks)."""
        while self.queue.pending or self.queue.in_flight:
            await asyncio.sleep(0.001)

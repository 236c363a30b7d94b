"""Bounded calls to a shared store: a per-call timeout, a circuit breaker, a cap on calls in flight.

A pacer asks the store once per request. When the store is slow or gone, waiting for it would
add its latency to every request and pile up waiting calls (tasks, sockets, memory) faster than
they drain. So every call is bounded three ways, and each bound ends in `StoreUnavailable`, on
which the caller applies the limit's failure mode:
- a timeout per call (default 50 ms);
- a circuit breaker: after `failures` consecutive failures it opens, and calls fail at once,
  without touching the network, until `interval_s` has passed; then exactly one call goes
  through as a probe: its success closes the breaker, its failure opens it for another interval;
- at most `max_in_flight` calls at once; more fail at once instead of queueing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from meshgate.pacing.store import StoreUnavailable
from meshgate.retry import Outage

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 0.05
DEFAULT_MAX_IN_FLIGHT = 128


class CircuitBreaker:
    """Closed, open, or open with one probe out. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        failures: int = 3,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or interval_s <= 0:
            raise ValueError("a circuit breaker needs failures >= 1 and interval_s > 0")
        self.threshold = failures
        self.interval_s = interval_s
        self.clock = clock
        self.failures = 0  # consecutive
        self.opened_at: float | None = None  # None: closed
        self.probing = False

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def admit(self) -> bool:
        """May a call go ahead? Returns whether it is the probe; raises StoreUnavailable if not."""
        if self.opened_at is None:
            return False
        if self.probing or self.clock() - self.opened_at < self.interval_s:
            raise StoreUnavailable("store circuit open after repeated failures")
        self.probing = True
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failed(self, probe: bool) -> None:
        self.failures += 1
        if probe or self.failures >= self.threshold:
            self.opened_at = self.clock()
            self.probing = False

    def abandoned(self, probe: bool) -> None:
        """The call ended without telling anything about the store (cancelled, bad input)."""
        if probe:
            self.probing = False


class StoreGuard:
    """Runs store calls within the three bounds; `errors` are the client's failure exceptions."""

    def __init__(
        self,
        name: str,
        errors: tuple[type[BaseException], ...],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if timeout_s <= 0 or max_in_flight < 1:
            raise ValueError("a store guard needs timeout_s > 0 and max_in_flight >= 1")
        self.name = name
        self.errors = errors
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.in_flight = 0
        self.outage = Outage(log)

    async def call(self, op: Callable[[], Awaitable[T]]) -> T:
        if self.in_flight >= self.max_in_flight:
            raise StoreUnavailable(f"{self.name}: {self.max_in_flight} calls already in flight")
        probe = self.breaker.admit()
        # The call runs in a task of its own, so the caller leaves at the timeout even when
        # the client library's clean-up after cancellation waits (redis-py closes the pool's
        # connection under a lock, for up to a TCP retransmission); the slot stays taken
        # until that clean-up ends, so such tasks are bounded too.
        loop = asyncio.get_running_loop()
        task = loop.create_task(_run(op))
        self.in_flight += 1
        waiter = loop.create_future()  # done when the call ends or its time is up
        task.add_done_callback(lambda t: self._ended(t, waiter))
        timer = loop.call_later(self.timeout_s, _wake, waiter)
        try:
            await waiter
        except BaseException:  # the caller was cancelled: says nothing about the store
            task.cancel()
            self.breaker.abandoned(probe)
            raise
        finally:
            timer.cancel()
        if not task.done():
            task.cancel()
            self._failed(probe, f"no answer within {self.timeout_s * 1000:g} ms")
            raise StoreUnavailable(f"{self.name}: no answer within {self.timeout_s * 1000:g} ms")
        try:
            result = task.result()
        except StoreUnavailable as e:
            self._failed(probe, str(e))
            raise
        except self.errors as e:
            self._failed(probe, f"{type(e).__name__}: {e}")
            raise StoreUnavailable(f"{self.name}: {type(e).__name__}: {e}") from e
        except BaseException:
            self.breaker.abandoned(probe)
            raise
        self.breaker.succeeded()
        self.outage.recovered("%s answers again", self.name)
        return result

    def _ended(self, task: asyncio.Task[Any], waiter: asyncio.Future[None]) -> None:
        self.in_flight -= 1
        if not task.cancelled():
            task.exception()  # retrieved: a timed-out call's late error is not news
        _wake(waiter)

    def _failed(self, probe: bool, why: str) -> None:
        self.breaker.failed(probe)
        self.outage.failed("%s failing (limits apply their failure mode): %s", self.name, why)


async def _run(op: Callable[[], Awaitable[T]]) -> T:
    return await op()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

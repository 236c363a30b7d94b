"""The LimitStore in one process: the control plane's embedded store, and the twin in tests.

Every method runs to completion without awaiting, so each is atomic on its event loop. Time
comes from an injectable clock (epoch seconds). Nothing grows without bound:
- a token bucket is forgotten once it is full again (a full bucket and no bucket are the same);
- a reservation is kept until its ttl passes (so a retried reserve gets the first answer), then
  dropped, charged in full if it was never settled;
- a window counter is dropped `window_margin_s` after its window ends;
and each kind has a cap: past it, operations that would add one raise StoreUnavailable (the
limit's failure mode then applies) instead of growing further.
Expired entries are swept lazily at the start of every operation, from heaps ordered by due
time, so an operation does O(log n) work per expired entry and never scans.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from meshgate.pacing.store import (
    BudgetState,
    Charge,
    RateDecision,
    Reservation,
    StoreUnavailable,
)

MAX_RESERVATION_ID = 256
EPSILON = 1e-9  # float slack in the token count, so 0.9999999999 refilled tokens are one
WindowKey = tuple[str, int]  # (budget, window_start)


@dataclass
class _Bucket:
    tokens: float
    at: float
    requests: int
    per_seconds: int

    def full_at(self) -> float:
        return self.at + (self.requests - self.tokens) * self.per_seconds / self.requests


@dataclass
class _Window:
    budget: str
    start: int
    end: int
    limit: int
    spent: int = 0
    reserved: int = 0

    def state(self) -> BudgetState:
        return BudgetState(self.budget, self.start, self.end, self.limit, self.spent, self.reserved)


@dataclass
class _Held:
    answer: Reservation
    charges: tuple[tuple[WindowKey, int], ...]  # empty once settled (or never admitted)
    expires_at: float


def validate_reserve(reservation: str, charges: Sequence[Charge], ttl_s: float) -> None:
    """Shared by every store, so all refuse the same inputs (ValueError) before touching state."""
    if not reservation or len(reservation) > MAX_RESERVATION_ID:
        raise ValueError(f"a reservation id has 1 to {MAX_RESERVATION_ID} characters")
    if not (ttl_s > 0 and math.isfinite(ttl_s)):
        raise ValueError(f"a reservation ttl must be > 0 seconds, got {ttl_s!r}")
    for c in charges:
        if not c.budget or c.limit < 0 or c.amount < 0 or c.window_end <= c.window_start:
            raise ValueError(f"bad charge: {c!r}")


def validate_hit(key: str, requests: int, per_seconds: int, want: int = 1) -> None:
    if not key or requests < 1 or per_seconds < 1:
        raise ValueError(f"bad rate limit: {key!r} {requests}/{per_seconds}s")
    if want < 1:
        raise ValueError(f"a hit takes at least one token, not {want}")


def validate_actual(actual: Mapping[str, int]) -> None:
    for budget, amount in actual.items():
        if amount < 0:
            raise ValueError(f"negative usage for {budget!r}: {amount}")


def aggregate(charges: Sequence[Charge]) -> dict[WindowKey, Charge]:
    """One charge per counter, in first-seen order (a budget named twice asks for the sum;
    the last limit given wins)."""
    merged: dict[WindowKey, Charge] = {}
    for c in charges:
        key = (c.budget, c.window_start)
        prev = merged.get(key)
        amount = c.amount if prev is None else prev.amount + c.amount
        merged[key] = Charge(c.budget, c.limit, amount, c.window_start, c.window_end)
    return merged


class MemoryStore:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        window_margin_s: float = 3600.0,
        max_buckets: int = 100_000,
        max_windows: int = 100_000,
        max_reservations: int = 1_000_000,
    ) -> None:
        self.clock = clock
        self.window_margin_s = window_margin_s
        self.max_buckets = max_buckets
        self.max_windows = max_windows
        self.max_reservations = max_reservations
        self._buckets: dict[str, _Bucket] = {}
        self._windows: dict[WindowKey, _Window] = {}
        self._held: dict[str, _Held] = {}
        # (due, key): at most one entry per live key; an entry whose key is due later is
        # pushed back with its new due time when popped
        self._bucket_due: list[tuple[float, str]] = []
        self._window_due: list[tuple[float, WindowKey]] = []
        self._held_due: list[tuple[float, str]] = []

    def sizes(self) -> tuple[int, int, int]:
        """(buckets, windows, reservations) held now: for tests and metrics."""
        return len(self._buckets), len(self._windows), len(self._held)

    async def hit(self, key: str, requests: int, per_seconds: int, want: int = 1) -> RateDecision:
        validate_hit(key, requests, per_seconds, want)
        now = self._sweep()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:
                raise StoreUnavailable(f"memory store: {self.max_buckets} rate buckets in use")
            bucket = _Bucket(float(requests), now, requests, per_seconds)
            self._buckets[key] = bucket
            heapq.heappush(self._bucket_due, (now + per_seconds / requests, key))
        else:
            elapsed = max(0.0, now - bucket.at)
            refill = elapsed * requests / per_seconds
            bucket.tokens = min(float(requests), bucket.tokens + refill)
            bucket.at, bucket.requests, bucket.per_seconds = now, requests, per_seconds
        rate = requests / per_seconds
        granted = min(want, int(bucket.tokens + EPSILON))
        if granted:
            bucket.tokens = max(0.0, bucket.tokens - granted)
            reset = (requests - bucket.tokens) / rate
        else:
            reset = (1 - bucket.tokens) / rate
        return RateDecision(granted > 0, requests, int(bucket.tokens + EPSILON), reset, granted)

    async def reserve(
        self, reservation: str, charges: Sequence[Charge], ttl_s: float
    ) -> Reservation:
        validate_reserve(reservation, charges, ttl_s)
        now = self._sweep()
        held = self._held.get(reservation)
        if held is not None:
            return held.answer
        if len(self._held) >= self.max_reservations:
            raise StoreUnavailable(f"memory store: {self.max_reservations} reservations held")
        wanted = aggregate(charges)
        refused: str | None = None
        for key, c in wanted.items():
            w = self._windows.get(key)
            used = 0 if w is None else w.spent + w.reserved
            if used + c.amount > c.limit:
                refused = c.budget
                break
        if refused is None:
            new = sum(1 for key in wanted if key not in self._windows)
            if len(self._windows) + new > self.max_windows:
                raise StoreUnavailable(f"memory store: {self.max_windows} budget windows in use")
            for key, c in wanted.items():
                w = self._windows.get(key)
                if w is None:
                    w = _Window(c.budget, c.window_start, c.window_end, c.limit)
                    self._windows[key] = w
                    due = c.window_end + self.window_margin_s
                    heapq.heappush(self._window_due, (due, key))
                w.limit = c.limit
                w.reserved += c.amount
        states = tuple(self._state(key, c) for key, c in wanted.items())
        answer = Reservation(refused is None, refused, states)
        held_charges = tuple((k, c.amount) for k, c in wanted.items()) if refused is None else ()
        self._held[reservation] = _Held(answer, held_charges, now + ttl_s)
        heapq.heappush(self._held_due, (now + ttl_s, reservation))
        return answer

    async def settle(self, reservation: str, actual: Mapping[str, int]) -> None:
        validate_actual(actual)
        self._sweep()
        held = self._held.get(reservation)
        if held is None or not held.charges:
            return
        for (budget, start), amount in held.charges:
            w = self._windows.get((budget, start))
            if w is not None:
                w.reserved -= amount
                w.spent += actual.get(budget, amount)
        held.charges = ()  # kept until its ttl: a retried reserve still gets the first answer

    async def budgets(self, prefix: str = "") -> list[BudgetState]:
        now = self._sweep()
        return sorted(
            (
                w.state()
                for w in self._windows.values()
                if w.budget.startswith(prefix) and w.start <= now < w.end
            ),
            key=lambda s: (s.budget, s.window_start),
        )

    async def close(self) -> None:
        pass

    def _state(self, key: WindowKey, c: Charge) -> BudgetState:
        w = self._windows.get(key)
        if w is None:
            return BudgetState(c.budget, c.window_start, c.window_end, c.limit, 0, 0)
        return w.state()

    def _sweep(self) -> float:
        """Drop what is due, charging expired reservations in full; the time of the operation."""
        now = self.clock()
        due = self._held_due
        while due and due[0][0] <= now:
            _, rid = heapq.heappop(due)
            held = self._held.pop(rid, None)
            if held is None:
                continue
            for key, amount in held.charges:
                w = self._windows.get(key)
                if w is not None:
                    w.reserved -= amount
                    w.spent += amount
        while self._window_due and self._window_due[0][0] <= now:
            _, wkey = heapq.heappop(self._window_due)
            self._windows.pop(wkey, None)
        while self._bucket_due and self._bucket_due[0][0] <= now:
            _, bkey = heapq.heappop(self._bucket_due)
            bucket = self._buckets.get(bkey)
            if bucket is None:
                continue
            full_at = bucket.full_at()
            if full_at <= now:
                del self._buckets[bkey]
            else:
                heapq.heappush(self._bucket_due, (full_at, bkey))
        return now

"""An in-test twin of the limit store, so the pacer is tested alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

from meshgate.pacing.store import (
    BudgetState,
    Charge,
    RateDecision,
    Reservation,
    StoreUnavailable,
)


class TwinStore:
    """Token buckets and budget counters in a dict; `down` makes every call fail."""

    def __init__(self) -> None:
        self.down = False
        self.delay = 0.0
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self.spent: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.windows: dict[str, tuple[int, int, int]] = {}  # budget -> (start, end, limit)
        self.open: dict[str, tuple[tuple[Charge, ...], Reservation]] = {}
        self.settled: dict[str, Mapping[str, int]] = {}

    async def _gate(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            raise StoreUnavailable("twin store is down")

    async def hit(self, key: str, requests: int, per_seconds: int) -> RateDecision:
        await self._gate()
        now = time.monotonic()
        rate = requests / per_seconds
        tokens, at = self.buckets.get(key, (float(requests), now))
        tokens = min(float(requests), tokens + (now - at) * rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self.buckets[key] = (tokens, now)
        reset = (requests - tokens) / rate if allowed else (1 - tokens) / rate
        return RateDecision(allowed, requests, int(tokens), reset)

    def state(self, budget: str) -> BudgetState:
        start, end, limit = self.windows[budget]
        return BudgetState(
            budget, start, end, limit, self.spent.get(budget, 0), self.reserved.get(budget, 0)
        )

    async def reserve(
        self, reservation: str, charges: Sequence[Charge], ttl_s: float
    ) -> Reservation:
        await self._gate()
        if reservation in self.open:
            return self.open[reservation][1]
        for c in charges:
            self.windows[c.budget] = (c.window_start, c.window_end, c.limit)
        refused = next(
            (
                c.budget
                for c in charges
                if self.spent.get(c.budget, 0) + self.reserved.get(c.budget, 0) + c.amount > c.limit
            ),
            None,
        )
        if refused is None:
            for c in charges:
                self.reserved[c.budget] = self.reserved.get(c.budget, 0) + c.amount
        answer = Reservation(refused is None, refused, tuple(self.state(c.budget) for c in charges))
        if refused is None:
            self.open[reservation] = (tuple(charges), answer)
        return answer

    async def settle(self, reservation: str, actual: Mapping[str, int]) -> None:
        await self._gate()
        if reservation not in self.open:
            return
        charges, _ = self.open.pop(reservation)
        for c in charges:
            self.reserved[c.budget] -= c.amount
            self.spent[c.budget] = self.spent.get(c.budget, 0) + actual.get(c.budget, c.amount)
        self.settled[reservation] = dict(actual)

    async def budgets(self, prefix: str = "") -> list[BudgetState]:
        return [self.state(b) for b in self.windows if b.startswith(prefix)]

    async def close(self) -> None:
        pass

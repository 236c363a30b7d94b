"""The real MemoryStore, which a test can take down or slow down, and read from its own thread."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from meshgate.pacing.memory_store import MemoryStore
from meshgate.pacing.store import (
    BudgetState,
    Charge,
    RateDecision,
    Reservation,
    StoreUnavailable,
)


class FlakyStore:
    """Delegates to a MemoryStore on the pacer's loop; `down` fails every call, `delay` slows
    it. `settled`: what each settled reservation was settled with; `open`: reservations held."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.down = False
        self.delay = 0.0
        self.settled: dict[str, Mapping[str, int]] = {}
        self.open: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _gate(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            raise StoreUnavailable("the test took the store down")

    async def hit(self, key: str, requests: int, per_seconds: int, want: int = 1) -> RateDecision:
        await self._gate()
        return await self.inner.hit(key, requests, per_seconds, want)

    async def reserve(
        self, reservation: str, charges: Sequence[Charge], ttl_s: float
    ) -> Reservation:
        await self._gate()
        answer = await self.inner.reserve(reservation, charges, ttl_s)
        if answer.admitted:
            self.open.add(reservation)
        return answer

    async def settle(self, reservation: str, actual: Mapping[str, int]) -> None:
        await self._gate()
        await self.inner.settle(reservation, actual)
        if reservation in self.open:
            self.open.discard(reservation)
            self.settled[reservation] = dict(actual)

    async def budgets(self, prefix: str = "") -> list[BudgetState]:
        await self._gate()
        return await self.inner.budgets(prefix)

    async def close(self) -> None:
        pass

    def states(self) -> dict[str, BudgetState]:
        """Read on the store's loop (it sweeps as it reads), from any other thread."""
        if self._loop is None:
            return {}
        future = asyncio.run_coroutine_threadsafe(self.inner.budgets(), self._loop)
        return {s.budget: s for s in future.result(5)}

    @property
    def spent(self) -> dict[str, int]:
        return {b: s.spent for b, s in self.states().items()}

    @property
    def reserved(self) -> dict[str, int]:
        return {b: s.reserved for b, s in self.states().items()}

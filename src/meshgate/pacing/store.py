"""Where global limits and budgets are counted: the Protocol every store implements.

Implementations: `MemoryStore` (in process; the control plane's embedded store, and the twin
in tests), `RedisStore` (shared by every replica; one Lua script per operation, so each is
atomic), `RemoteStore` (a gateway's client of the control plane's embedded store).

Budgets are reserved before a request is admitted and settled when it ends. A reservation names
the request (`<x-request-id>`), so a retried reserve or settle is applied once. A reservation
never settled is charged in full when its `ttl_s` passes, so a gateway that dies mid-request
never gives spend back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


class StoreUnavailable(Exception):
    """The store did not answer in time or at all; the caller applies the limit's failure mode."""


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: float  # until the bucket is full again (x-ratelimit-reset); retry-after when refused
    granted: int = 1  # tokens taken (1 <= granted <= want when allowed, else 0)


@dataclass(frozen=True)
class Charge:
    """What one request asks of one budget counter in its current window."""

    budget: str  # BudgetSpec.id
    limit: int
    amount: int  # the most the request can cost, in the budget's unit
    window_start: int  # epoch seconds (spec.window_bounds)
    window_end: int


@dataclass(frozen=True)
class BudgetState:
    budget: str
    window_start: int
    window_end: int
    limit: int
    spent: int  # settled, plus expired reservations charged in full
    reserved: int  # held by requests in flight


@dataclass(frozen=True)
class Reservation:
    """`admitted`: every charge fitted and is now held; otherwise none is held and `refused`
    names the first budget that would have gone over. `states` as of the decision."""

    admitted: bool
    refused: str | None
    states: tuple[BudgetState, ...]


class LimitStore(Protocol):
    async def hit(self, key: str, requests: int, per_seconds: int, want: int = 1) -> RateDecision:
        """Take up to `want` whole tokens from the bucket `key` (capacity `requests`, refilled
        at `requests / per_seconds` per second): as many as there are, if there is at least
        one (a pacer takes several at once and spends them locally: `pacer.leases`)."""
        ...

    async def reserve(
        self, reservation: str, charges: Sequence[Charge], ttl_s: float
    ) -> Reservation:
        """Hold every charge, or none. Reserving an id again returns the first answer."""
        ...

    async def settle(self, reservation: str, actual: Mapping[str, int]) -> None:
        """End a reservation: each budget is charged `actual[budget]` (what the provider
        reported, even above what was reserved), or what was reserved when absent. Settling
        twice, or an unknown or expired reservation, changes nothing."""
        ...

    async def budgets(self, prefix: str = "") -> list[BudgetState]:
        """Current windows of the budget counters whose id starts with `prefix`."""
        ...

    async def close(self) -> None: ...

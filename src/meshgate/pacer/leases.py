"""Global rate limits decided in the pacer from tokens leased out of the shared store.

A round trip to the store per request would cost more than the request itself (the store is
shared by every gateway replica), so the pacer takes several tokens at once from the global
bucket (`LimitStore.hit(..., want=n)`) and spends them locally. A lease never creates tokens:
every token admitted here was taken from the shared bucket, so replicas together never admit
more than the bucket holds. What a lease can cost is the other way: tokens a replica took but
did not spend before the lease ends are lost to the others. Leases are kept small so that loss
stays small:
- a lease asks for about `HORIZON_S` of this replica's recent demand, and never more than
  `FRACTION` of what the bucket held at the last take, so near exhaustion leases shrink to one
  token and replicas share the last tokens request by request;
- a lease ends after `TTL_S` (a token held longer would let a replica burst above the bucket's
  capacity once the bucket refilled behind it).

A bucket the store called empty stays empty here until the store's own reset says one token
is back, so refusals cost no store call either. Concurrent requests that find no token wait
for one take (never one take each).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshgate.pacing.spec import GlobalLimit
from meshgate.pacing.store import LimitStore

HORIZON_S = 0.05
FRACTION = 0.05
TTL_S = 1.0
IDLE_S = 60.0  # a lease untouched this long is forgotten
MAX_LEASES = 100_000


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int  # as of this replica's view: the bucket at the last take, less spent since
    reset_s: float  # until the bucket is full (allowed) / one token is back (refused)


class _Lease:
    __slots__ = (
        "empty_until",
        "expires",
        "hits",
        "rate",
        "rate_at",
        "refill",
        "remaining",
        "reset_at",
        "tokens",
        "used",
        "waiting",
    )

    def __init__(self, now: float) -> None:
        self.tokens = 0  # taken from the store, not yet spent
        self.expires = 0.0
        self.remaining = -1  # the bucket's tokens after the last take (-1: never taken)
        self.reset_at = now  # when the bucket is full again, as of the last take
        self.empty_until = 0.0  # the store said empty: refuse locally until then
        self.hits = 0  # requests since rate_at
        self.rate = 0.0  # requests per second here, smoothed
        self.rate_at = now
        self.used = now
        self.refill: asyncio.Future[None] | None = None
        self.waiting = 0


class LeasedLimits:
    """Exceptions of the store (StoreUnavailable, TimeoutError) reach the caller, which applies
    the limit's failure mode; every request waiting on the same take gets the same one."""

    def __init__(
        self,
        store: LimitStore,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_take: Callable[[], None] | None = None,
    ) -> None:
        """`on_take`: called for each store call (a metric)."""
        self._store = store
        self._on_take = on_take
        self._timeout = timeout_s
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._next_sweep = clock() + IDLE_S

    def try_now(self, limit: GlobalLimit) -> Verdict | None:
        """The verdict when it needs no store call, else None (then `hit`)."""
        now = self._clock()
        lease = self._leases.get(limit.key)
        verdict = None if lease is None else self._local(limit, lease, now)
        if lease is not None and verdict is not None:
            lease.hits += 1
            lease.used = now
        return verdict

    async def hit(self, limit: GlobalLimit) -> Verdict:
        now = self._clock()
        lease = self._leases.get(limit.key)
        if lease is None:
            if now >= self._next_sweep or len(self._leases) >= MAX_LEASES:
                self._sweep(now)
            lease = self._leases[limit.key] = _Lease(now)
        lease.hits += 1
        lease.used = now
        while True:
            verdict = self._local(limit, lease, self._clock())
            if verdict is not None:
                return verdict
            if lease.refill is None or lease.refill.done():
                lease.refill = asyncio.ensure_future(self._take(limit, lease))
            lease.waiting += 1
            try:
                await asyncio.shield(lease.refill)
            finally:
                lease.waiting -= 1

    async def _take(self, limit: GlobalLimit, lease: _Lease) -> None:
        now = self._clock()
        elapsed = now - lease.rate_at
        if elapsed >= HORIZON_S:
            recent = lease.hits / elapsed
            lease.rate = (lease.rate + recent) / 2 if lease.rate else recent
            lease.hits, lease.rate_at = 0, now
        known = lease.remaining if lease.remaining >= 0 else limit.requests
        want = max(1 + lease.waiting, math.ceil(lease.rate * HORIZON_S))
        want = max(1, min(want, int(known * FRACTION)))
        if self._on_take is not None:
            self._on_take()
        async with asyncio.timeout(self._timeout):
            decision = await self._store.hit(limit.key, limit.requests, limit.per_seconds, want)
        now = self._clock()
        lease.remaining = decision.remaining
        if decision.allowed:
            lease.tokens, lease.expires = decision.granted, now + TTL_S
            lease.reset_at = now + decision.reset_s
            lease.empty_until = 0.0
        else:
            lease.tokens = 0
            lease.empty_until = now + decision.reset_s

    def _local(self, limit: GlobalLimit, lease: _Lease, now: float) -> Verdict | None:
        """Spend a leased token, or refuse while the store said empty; None: ask the store."""
        if lease.tokens > 0 and now < lease.expires:
            lease.tokens -= 1
            remaining = max(0, lease.remaining + lease.tokens)
            return Verdict(True, limit.requests, remaining, max(0.0, lease.reset_at - now))
        if now < lease.empty_until:
            return Verdict(False, limit.requests, 0, lease.empty_until - now)
        return None

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + IDLE_S
        for k in [k for k, lease in self._leases.items() if now - lease.used > IDLE_S]:
            if _idle(self._leases[k]):
                del self._leases[k]
        if len(self._leases) >= MAX_LEASES:  # all busy: forget the least recently used half
            by_use = sorted(self._leases.items(), key=lambda kv: kv[1].used)
            for k, lease in by_use[: len(by_use) // 2]:
                if _idle(lease):
                    del self._leases[k]


def _idle(lease: _Lease) -> bool:
    return lease.refill is None or lease.refill.done()

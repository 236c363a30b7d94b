"""The LimitStore in Redis, shared by every gateway and control-plane replica.

Each operation is one Lua script (`redis_scripts`), run with EVALSHA (loaded again when Redis
forgot it), so it is atomic and takes its time from Redis: replicas never disagree on a window
or a bucket's refill. Every call goes through a `StoreGuard` (timeout, circuit breaker, cap on
calls in flight), and redis-py's own retries are off: a retry on the hot path would only add
the latency the timeout exists to bound. The pool holds at most `max_in_flight` connections.

Every key has a TTL, so the Redis must not evict keys early: run it with
`maxmemory-policy noeviction` (an evicted budget window would forget its spend).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from meshgate.pacing import redis_scripts
from meshgate.pacing.breaker import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_TIMEOUT_S,
    CircuitBreaker,
    StoreGuard,
)
from meshgate.pacing.memory_store import (
    aggregate,
    validate_actual,
    validate_hit,
    validate_reserve,
)
from meshgate.pacing.store import (
    BudgetState,
    Charge,
    RateDecision,
    Reservation,
    StoreUnavailable,
)

DEFAULT_PREFIX = "meshgate:limits:"
SCHEMES = ("redis", "rediss")


def read_password(path: str | os.PathLike[str]) -> str:
    """A password file's first line (a trailing newline is not part of the password)."""
    text = Path(path).read_text(encoding="utf-8")
    return text.splitlines()[0] if text else ""


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        password_file: str | os.PathLike[str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        breaker: CircuitBreaker | None = None,
        prefix: str = DEFAULT_PREFIX,
        window_margin_s: float = 3600.0,
    ) -> None:
        """`url`: redis://[:password@]host:port/db or rediss://... (TLS). Read once, here (at
        startup, before the event loop serves requests): `password_file`'s first line."""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ValueError(f"a limit store URL is redis://host:port/db or rediss://...: {url!r}")
        options: dict[str, Any] = {}
        if password_file is not None:
            if parts.password:
                raise ValueError("give the Redis password in the URL or in a file, not both")
            options["password"] = read_password(password_file)
        pool = aioredis.ConnectionPool.from_url(
            url,
            max_connections=max_in_flight,
            socket_connect_timeout=timeout_s,
            socket_timeout=max(timeout_s * 4, 1.0),  # the guard's timeout comes first
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            **options,
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self.prefix = prefix
        self.window_margin_s = window_margin_s
        self.guard = StoreGuard(
            f"redis limit store {parts.hostname}:{parts.port or 6379}",
            (RedisError, OSError),
            timeout_s,
            max_in_flight,
            breaker,
        )
        self._hit = self.redis.register_script(redis_scripts.HIT)
        self._reserve = self.redis.register_script(redis_scripts.RESERVE)
        self._settle = self.redis.register_script(redis_scripts.SETTLE)
        self._budgets = self.redis.register_script(redis_scripts.BUDGETS)

    async def hit(self, key: str, requests: int, per_seconds: int, want: int = 1) -> RateDecision:
        validate_hit(key, requests, per_seconds, want)
        args: list[str | int] = [self.prefix, key, requests, per_seconds, want]
        reply = await self.guard.call(lambda: self._hit(args=args))
        granted, remaining, reset = reply
        granted = int(granted)
        return RateDecision(granted > 0, requests, int(remaining), float(reset), granted)

    async def reserve(
        self, reservation: str, charges: Sequence[Charge], ttl_s: float
    ) -> Reservation:
        validate_reserve(reservation, charges, ttl_s)
        wanted = [
            [c.budget, c.limit, c.amount, c.window_start, c.window_end]
            for c in aggregate(charges).values()
        ]
        args = [
            self.prefix,
            reservation,
            repr(float(ttl_s)),
            repr(float(self.window_margin_s)),
            json.dumps(wanted, separators=(",", ":")),
        ]
        reply = await self.guard.call(lambda: self._reserve(args=args))
        return _answer(reply)

    async def settle(self, reservation: str, actual: Mapping[str, int]) -> None:
        validate_actual(actual)
        if not reservation:
            return
        args = [self.prefix, reservation, json.dumps(dict(actual), separators=(",", ":"))]
        await self.guard.call(lambda: self._settle(args=args))

    async def budgets(self, prefix: str = "") -> list[BudgetState]:
        args = [self.prefix, repr(float(self.window_margin_s)), prefix]
        reply = await self.guard.call(lambda: self._budgets(args=args))
        states = [_state(row) for row in _json_list(reply)]
        return sorted(states, key=lambda s: (s.budget, s.window_start))

    async def close(self) -> None:
        await self.redis.aclose()


def _json_list(reply: Any) -> list[Any]:
    data = json.loads(reply)
    return data if isinstance(data, list) else []  # Lua's cjson writes an empty list as {}


def _state(row: list[Any]) -> BudgetState:
    budget, start, end, limit, spent, reserved = row
    return BudgetState(budget, int(start), int(end), int(limit), int(spent), int(reserved))


def _answer(reply: Any) -> Reservation:
    try:
        data = json.loads(reply)
        states = data["s"] if isinstance(data["s"], list) else []
        refused = data["f"] if isinstance(data["f"], str) else None
        return Reservation(bool(data["a"]), refused, tuple(_state(r) for r in states))
    except (ValueError, KeyError, TypeError) as e:  # not our script's answer: fail as down
        raise StoreUnavailable(f"redis limit store: unexpected reply {reply!r:.200}") from e

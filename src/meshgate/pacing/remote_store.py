"""A gateway's LimitStore when it has no Redis: the control plane's store, over gRPC.

Calls go over a channel the caller owns (the gateway's channel to the control plane's xDS port,
with its mTLS credentials and join token), each within a `StoreGuard` (deadline, circuit
breaker, cap on calls in flight). Calls never wait for the channel to become ready: with the
control plane unreachable they fail at once, and the limit's failure mode applies. So the
first call does not spend its 50 ms on a TLS handshake, wait for `channel.channel_ready()` at
start-up, and give the channel `CHANNEL_OPTIONS` (short reconnect backoff).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from meshgate.pacing import store_wire as wire
from meshgate.pacing.breaker import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_TIMEOUT_S,
    CircuitBreaker,
    StoreGuard,
)
from meshgate.pacing.memory_store import validate_actual, validate_hit, validate_reserve
from meshgate.pacing.store import (
    BudgetState,
    Charge,
    RateDecision,
    Reservation,
    StoreUnavailable,
)

T = TypeVar("T")

# For the channel a RemoteStore uses: gRPC's default reconnect backoff grows to 120 s, so a
# channel would stay failed (and every limit in its failure mode) long after the control plane
# is back; with these it tries again within a second or two.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class _Unavailable(Exception):
    """Any failed call but a refused request: counts against the breaker."""


class RemoteStore:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.metadata = tuple(metadata)
        self.timeout_s = timeout_s
        self.guard = StoreGuard(
            "control plane limit store", (_Unavailable,), timeout_s, max_in_flight, breaker
        )
        self._methods = {
            name: channel.unary_unary(
                f"/{wire.SERVICE}/{name}", request_serializer=None, response_deserializer=None
            )
            for name in (wire.HIT, wire.RESERVE, wire.SETTLE, wire.BUDGETS)
        }

    async def _call(self, name: str, request: bytes) -> dict[str, Any]:
        method = self._methods[name]

        async def call() -> dict[str, Any]:
            try:
                reply = await method(
                    request,
                    timeout=self.timeout_s,
                    metadata=self.metadata,
                    wait_for_ready=False,
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(f"limit store refused the request: {e.details()}") from None
                raise _Unavailable(f"{e.code().name}: {e.details()}") from None
            try:
                return wire.load(reply)
            except ValueError as e:
                raise _Unavailable(f"bad reply: {e}") from None

        return await self.guard.call(call)

    async def hit(self, key: str, requests: int, per_seconds: int, want: int = 1) -> RateDecision:
        validate_hit(key, requests, per_seconds, want)
        data = await self._call(wire.HIT, wire.hit_request(key, requests, per_seconds, want))
        return _parsed(wire.parse_decision, data)

    async def reserve(
        self, reservation: str, charges: Sequence[Charge], ttl_s: float
    ) -> Reservation:
        validate_reserve(reservation, charges, ttl_s)
        data = await self._call(wire.RESERVE, wire.reserve_request(reservation, charges, ttl_s))
        return _parsed(wire.parse_reservation, data)

    async def settle(self, reservation: str, actual: Mapping[str, int]) -> None:
        validate_actual(actual)
        await self._call(wire.SETTLE, wire.settle_request(reservation, actual))

    async def budgets(self, prefix: str = "") -> list[BudgetState]:
        data = await self._call(wire.BUDGETS, wire.budgets_request(prefix))
        return _parsed(wire.parse_states, data)

    async def close(self) -> None:
        """The channel belongs to the caller, who closes it."""


def _parsed(parse: Callable[[dict[str, Any]], T], data: dict[str, Any]) -> T:
    try:
        return parse(data)
    except (ValueError, KeyError, TypeError) as e:
        raise StoreUnavailable(f"control plane limit store: bad reply: {e}") from None

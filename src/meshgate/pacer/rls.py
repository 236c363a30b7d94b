"""Envoy's rate-limit service (envoy.service.ratelimit.v3) for global limits.

Each descriptor carries its whole limit (spec.descriptor_entries), so the pacer holds no
policy. A descriptor the pacer cannot read is refused (OVER_LIMIT): fail closed.

When the store does not answer within `timeout_s`, a descriptor applies its failure mode:
- open: counted as allowed (OK), so the route keeps serving;
- closed: the whole call fails with gRPC UNAVAILABLE. The translation puts fail-closed limits
  in the second ratelimit filter (`failure_mode_deny: true`), which then answers with its
  `status_on_error` and response flag RLSE (RateLimitServiceError), response code details
  `rate_limiter_error`: the audit tells "store down" apart from "over the limit" (429, flag RL).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import duration_pb2

from meshgate.pacer.metrics import RLS, PacerMetrics
from meshgate.pacing.spec import RLS_DOMAIN, parse_descriptor
from meshgate.pacing.store import LimitStore, StoreUnavailable

log = logging.getLogger(__name__)

SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
Code = rls_pb2.RateLimitResponse.Code
Unit = rls_pb2.RateLimitResponse.RateLimit.Unit
_UNITS = ((86400, Unit.DAY), (3600, Unit.HOUR), (60, Unit.MINUTE), (1, Unit.SECOND))


class RateLimitServicer:
    def __init__(
        self,
        store: LimitStore,
        metrics: PacerMetrics,
        timeout_s: float = 0.1,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._timeout = timeout_s

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
                    self.ShouldRateLimit,
                    request_deserializer=rls_pb2.RateLimitRequest.FromString,
                    response_serializer=rls_pb2.RateLimitResponse.SerializeToString,
                )
            },
        )

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rls_pb2.RateLimitResponse:
        response = rls_pb2.RateLimitResponse(overall_code=Code.OK)
        if request.domain != RLS_DOMAIN:
            log.warning("rate-limit call for domain %r refused", request.domain)
            return self._refuse_all(request, "bad_domain")
        retry_after = 0
        for descriptor in request.descriptors:
            try:
                limit = parse_descriptor([(e.key, e.value) for e in descriptor.entries])
            except ValueError as exc:
                log.warning("rate-limit descriptor refused: %s", exc)
                response.statuses.append(
                    rls_pb2.RateLimitResponse.DescriptorStatus(code=Code.OVER_LIMIT)
                )
                response.overall_code = Code.OVER_LIMIT
                self._metrics.decision(RLS, "bad_descriptor")
                continue
            try:
                async with asyncio.timeout(self._timeout):
                    decision = await self._store.hit(limit.key, limit.requests, limit.per_seconds)
            except (StoreUnavailable, TimeoutError) as exc:
                if limit.on_store_failure == "closed":
                    self._metrics.decision(RLS, "store_unavailable_closed")
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"limit store unavailable: {exc}"
                    )
                self._metrics.decision(RLS, "store_unavailable_open")
                response.statuses.append(rls_pb2.RateLimitResponse.DescriptorStatus(code=Code.OK))
                continue
            status = rls_pb2.RateLimitResponse.DescriptorStatus(
                code=Code.OK if decision.allowed else Code.OVER_LIMIT,
                current_limit=_rate_limit(limit.key, limit.requests, limit.per_seconds),
                limit_remaining=max(0, decision.remaining),
                duration_until_reset=_duration(decision.reset_s),
            )
            response.statuses.append(status)
            if not decision.allowed:
                response.overall_code = Code.OVER_LIMIT
                retry_after = max(retry_after, max(1, math.ceil(decision.reset_s)))
            self._metrics.decision(RLS, "ok" if decision.allowed else "over_limit")
        if retry_after:
            response.response_headers_to_add.append(
                base_pb2.HeaderValue(key="retry-after", value=str(retry_after))
            )
        return response

    def _refuse_all(self, request: rls_pb2.RateLimitRequest, why: str) -> rls_pb2.RateLimitResponse:
        self._metrics.decision(RLS, why)
        over = rls_pb2.RateLimitResponse.DescriptorStatus(code=Code.OVER_LIMIT)
        return rls_pb2.RateLimitResponse(
            overall_code=Code.OVER_LIMIT, statuses=[over] * max(1, len(request.descriptors))
        )


def _rate_limit(name: str, requests: int, per_seconds: int) -> rls_pb2.RateLimitResponse.RateLimit:
    """The limit in Envoy's units (x-ratelimit-limit's `w=`): exact when the window is a whole
    number of days, hours, minutes or seconds per unit, else per second (rounded up)."""
    for seconds, unit in _UNITS:
        if per_seconds % seconds == 0 and requests % (per_seconds // seconds) == 0:
            per_unit = requests // (per_seconds // seconds)
            return rls_pb2.RateLimitResponse.RateLimit(
                name=name, requests_per_unit=per_unit, unit=unit
            )
    return rls_pb2.RateLimitResponse.RateLimit(
        name=name, requests_per_unit=math.ceil(requests / per_seconds), unit=Unit.SECOND
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = max(0, math.ceil(seconds))
    return duration_pb2.Duration(seconds=whole)

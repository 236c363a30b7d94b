"""The pacer's refusals as ext_proc ImmediateResponses: a status, a JSON body an agent (and
the OpenAI/Anthropic SDKs, which read `error.message`) understands, and `details` = the spec
constant, which Envoy logs as the response code details (the audit decision)."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2

from meshgate.pacing import spec
from meshgate.pacing.store import BudgetState

PACE_SPEC_INVALID = "pace_spec_invalid"  # the route's spec was missing or unreadable

_STATUS = {
    spec.OVER_BUDGET: 429,
    spec.QUEUE_TIMEOUT: 503,
    spec.MODEL_NOT_ALLOWED: 403,
    spec.MAX_TOKENS_EXCEEDED: 400,
    spec.BODY_UNREADABLE: 400,
    spec.STORE_UNAVAILABLE: 503,
    PACE_SPEC_INVALID: 500,
}


def refusal(
    reason: str,
    message: str,
    retry_after_s: float | None = None,
    **fields: Any,
) -> ep.ImmediateResponse:
    body = {"error": {"type": reason, "message": message, **fields}}
    headers = [header("content-type", "application/json")]
    if retry_after_s is not None:
        headers.append(header("retry-after", str(max(1, math.ceil(retry_after_s)))))
    return ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=_STATUS[reason]),
        headers=ep.HeaderMutation(set_headers=headers),
        body=json.dumps(body, separators=(",", ":")).encode(),
        details=reason,
    )


def over_budget(state: BudgetState, unit: str, now: float) -> ep.ImmediateResponse:
    resets_at = dt.datetime.fromtimestamp(state.window_end, dt.UTC)
    return refusal(
        spec.OVER_BUDGET,
        f"budget {state.budget} is spent: {state.spent} {unit} spent and {state.reserved} "
        f"reserved of {state.limit}; it resets at {resets_at.isoformat()}",
        retry_after_s=state.window_end - now,
        budget=state.budget,
        unit=unit,
        spent=state.spent,
        reserved=state.reserved,
        limit=state.limit,
        resets_at=resets_at.isoformat(),
    )


def queue_timeout(key: str, waited_s: float, max_wait_s: float) -> ep.ImmediateResponse:
    return refusal(
        spec.QUEUE_TIMEOUT,
        f"waited {waited_s:.3f}s for an in-flight slot on {key} (at most {max_wait_s:g}s); "
        "too many requests in flight, retry later",
        retry_after_s=1,
        queue=key,
        waited_ms=round(waited_s * 1000),
        max_wait_ms=round(max_wait_s * 1000),
    )


def header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode())
    )

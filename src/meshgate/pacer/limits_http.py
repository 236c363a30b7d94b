"""The pacer's global-limit endpoint: one small HTTP/1.1 request per limited request.

Envoy's rate-limit service protocol (gRPC) costs the Python side ~300 us of CPU per call
before any decision is made, more than the request it limits; the same question over
HTTP/1.1 keep-alive, parsed by httptools and answered from a lease (`pacer.leases`), costs a
few tens of microseconds. The gateway's limits filter (a small Lua script, `xds.pacing`)
asks `GET /v1/limits?<spec.limits_query>` on a unix socket in the gateway's private
directory, and turns the answer into the response the agent gets.

Answers (header `x-meshgate-limit` says which; Envoy's own errors, when the pacer cannot be
reached, carry none and the filter applies each limit's failure mode itself):
- 200 ok: every limit had a token (x-ratelimit-* describe the tightest);
- 429 over: a limit had none (retry-after, x-ratelimit-*, a JSON body naming the limit);
- 503 unavailable: a limit that fails closed could not be checked (its store did not answer);
- 403 invalid: a query the pacer cannot read (fail closed; only a wrong build sends one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import OrderedDict
from typing import Any

import httptools

from meshgate.pacer.leases import LeasedLimits, Verdict
from meshgate.pacer.metrics import GLOBAL_LIMIT, PacerMetrics
from meshgate.pacing.spec import (
    LIMITS_PATH,
    LIMITS_VERDICT_HEADER,
    STORE_UNAVAILABLE,
    GlobalLimit,
    parse_limits_query,
)
from meshgate.pacing.store import StoreUnavailable

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 << 10  # a limits query is a few hundred bytes; Envoy adds a few headers
PARSED_CACHE = 4096  # distinct queries remembered parsed (one per limited route)


def _limit_header(limit: GlobalLimit) -> str:
    # draft-ietf-httpapi-ratelimit-headers-03, as Envoy's ratelimit filter writes it
    return f"{limit.requests}, {limit.requests};w={limit.per_seconds}"


def _response(status: str, verdict: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"{LIMITS_VERDICT_HEADER}: {verdict}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _agent(limit: GlobalLimit) -> str:
    return limit.key.split("/", 1)[0]  # keys are <agent>/<destination>/<rule>


def ok(limit: GlobalLimit, v: Verdict) -> bytes:
    return _response(
        "200 OK",
        "ok",
        [
            ("x-ratelimit-limit", _limit_header(limit)),
            ("x-ratelimit-remaining", str(v.remaining)),
            ("x-ratelimit-reset", str(math.ceil(v.reset_s))),
        ],
        b"",
    )


def over(limit: GlobalLimit, v: Verdict) -> bytes:
    retry = max(1, math.ceil(v.reset_s))
    body = _json(
        {
            "error": "rate_limited",
            "agent": _agent(limit),
            "limit": limit.key,
            "reason": f"{limit.requests} requests per {limit.per_seconds} s, shared by every "
            f"gateway replica; retry after {retry} s",
        }
    )
    return _response(
        "429 Too Many Requests",
        "over",
        [
            ("retry-after", str(retry)),
            ("x-ratelimit-limit", _limit_header(limit)),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", str(retry)),
            ("content-type", "application/json"),
        ],
        body,
    )


def unavailable(limit: GlobalLimit) -> bytes:
    body = _json(
        {
            "error": STORE_UNAVAILABLE,
            "agent": _agent(limit),
            "limit": limit.key,
            "reason": "a global rate limit that fails closed could not be checked: its limit "
            "store did not answer in time; retry shortly",
        }
    )
    return _response(
        "503 Service Unavailable",
        "unavailable",
        [("retry-after", "1"), ("content-type", "application/json")],
        body,
    )


# every limit failed open (its store silent): admitted, with nothing to say about a bucket
OPEN = _response("200 OK", "ok", [], b"")
INVALID = _response(
    "403 Forbidden",
    "invalid",
    [("content-type", "application/json")],
    _json({"error": "limit_spec_invalid", "reason": "the gateway sent a limit it cannot read"}),
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class LimitsEndpoint:
    """What the protocol asks; one per pacer (its leases and parsed-query cache)."""

    def __init__(self, leases: LeasedLimits, metrics: PacerMetrics) -> None:
        self.leases = leases
        self._metrics = metrics
        self._parsed: OrderedDict[bytes, list[GlobalLimit]] = OrderedDict()

    def parse(self, url: bytes) -> list[GlobalLimit] | None:
        limits = self._parsed.get(url)
        if limits is not None:
            return limits
        try:
            parts = httptools.parse_url(url)
            if parts.path != LIMITS_PATH.encode() or parts.query is None:
                raise ValueError(f"unknown path {parts.path!r}")
            limits = parse_limits_query(parts.query.decode("ascii"))
        except (ValueError, UnicodeDecodeError, httptools.HttpParserInvalidURLError) as exc:
            log.warning("pacer: global-limit query refused: %s", exc)
            return None
        self._parsed[url] = limits
        if len(self._parsed) > PARSED_CACHE:
            self._parsed.popitem(last=False)
        return limits

    def invalid(self) -> None:
        self._metrics.decision(GLOBAL_LIMIT, "bad_spec")

    def answer_now(self, limits: list[GlobalLimit]) -> bytes | None:
        """The answer when no store call is needed (the common case), else None."""
        if len(limits) != 1:
            return None
        limit = limits[0]
        v = self.leases.try_now(limit)
        if v is None:
            return None
        self._metrics.decision(GLOBAL_LIMIT, "ok" if v.allowed else "over_limit")
        return ok(limit, v) if v.allowed else over(limit, v)

    async def answer(self, limits: list[GlobalLimit]) -> bytes:
        tightest: tuple[GlobalLimit, Verdict] | None = None
        for limit in limits:
            try:
                v = await self.leases.hit(limit)
            except (StoreUnavailable, TimeoutError) as exc:
                if limit.on_store_failure == "closed":
                    self._metrics.decision(GLOBAL_LIMIT, "store_unavailable_closed")
                    log.debug("pacer: %s fails closed: %s", limit.key, exc)
                    return unavailable(limit)
                self._metrics.decision(GLOBAL_LIMIT, "store_unavailable_open")
                continue
            if not v.allowed:
                self._metrics.decision(GLOBAL_LIMIT, "over_limit")
                return over(limit, v)
            self._metrics.decision(GLOBAL_LIMIT, "ok")
            if tightest is None or v.remaining < tightest[1].remaining:
                tightest = (limit, v)
        if tightest is None:
            return OPEN
        return ok(*tightest)


class LimitsProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive from the gateway's Envoy; answers in request order."""

    def __init__(self, endpoint: LimitsEndpoint) -> None:
        self._endpoint = endpoint
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._size = 0
        self._bad = False
        self._tail: asyncio.Future[None] | None = None  # the last answer still being decided

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._size += len(data)
        try:
            if self._size > MAX_REQUEST_BYTES:
                raise httptools.HttpParserError("request too large")
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse()
        except httptools.HttpParserError:
            self._refuse()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._bad = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._bad = True  # a limits question has no body

    def on_message_complete(self) -> None:
        self._size = 0
        if self._bad or self._parser.get_method() != b"GET":
            self._refuse()
            return
        endpoint = self._endpoint
        limits = endpoint.parse(self._url)
        if limits is None:
            endpoint.invalid()
        if self._tail is None:  # nothing before it still being decided: answer now if we can
            now = INVALID if limits is None else endpoint.answer_now(limits)
            if now is not None:
                self._send(now)
                return
        self._tail = asyncio.ensure_future(self._answer_later(limits, self._tail))

    async def _answer_later(
        self, limits: list[GlobalLimit] | None, before: asyncio.Future[None] | None
    ) -> None:
        try:
            answer = INVALID if limits is None else await self._endpoint.answer(limits)
        except Exception:  # a bug: the request still gets an answer, by its failure modes
            log.exception("pacer: global-limit answer failed")
            closed = [lim for lim in limits or () if lim.on_store_failure == "closed"]
            answer = unavailable(closed[0]) if closed else OPEN
        if before is not None:
            await before
        self._send(answer)
        if self._tail is asyncio.current_task():
            self._tail = None

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _refuse(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(BAD_REQUEST)
            self._transport.close()

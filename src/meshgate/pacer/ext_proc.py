"""Envoy's external processor (envoy.service.ext_proc.v3) for budgets, in-flight caps, LLM
rules and MCP tool rules: one gRPC stream per HTTP request, for its whole life.

Request side: the route's PaceSpec arrives as the stream's gRPC metadata (spec.PACE_METADATA;
missing or unreadable: refused, fail closed). An LLM route asks for the buffered body first
(mode override) so the model and token ceiling are checked, and the reservation sized, before
any waiting. Admission is then the in-flight caps in spec order (the cap at index i waits at
most its own maxWait counted from the first wait, so no wait is cut short by Envoy: the pacer
raises Envoy's message timeout once, before it waits), then the budgets reserved in one store
call. Response side: an LLM response body is read (streamed) for the usage.

An MCP tool route (PaceSpec.mcp) asks for the buffered body too: it is read strictly and its
tool call checked with its arguments before admission (pacer/mcp.py), a refusal answered as
MCP clients expect; the answer to an allowed `tools/list` is buffered and filtered to the
tools the agent may call. The record gets the method, tool and arguments digest.

The stream's end is the request's end, however it ends: the last response message, Envoy
closing the stream (client gone, upstream reset, local reply), or the pacer refusing. Then,
and only then, the in-flight slots are released and the reservation settled: with the
usage found; with no tokens when the provider refused the call (a complete 4xx answer); else
with nothing, which charges what was reserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import duration_pb2, struct_pb2

from meshgate.mcp.decision import RequestFacts, ToolPolicy
from meshgate.mcp.jsonrpc import TOOLS_LIST
from meshgate.pacer import mcp, refusals
from meshgate.pacer.fair_queue import Limiter, Slot
from meshgate.pacer.metrics import ADMISSION, PacerMetrics
from meshgate.pacing import spec
from meshgate.pacing.llm_request import LlmRequest, Refusal, read_request
from meshgate.pacing.llm_usage import UsageReader
from meshgate.pacing.store import Charge, LimitStore, StoreUnavailable
from meshgate.retry import Backoff

log = logging.getLogger(__name__)

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
SETTLE_ATTEMPTS = 4
SETTLE_BACKOFF = Backoff(0.2, 2.0)
Mode = processing_mode_pb2.ProcessingMode


def _mode(
    response_headers: bool = False,
    request_body: int = Mode.NONE,
    response_body: int = Mode.NONE,
    response_trailers: bool = False,
) -> processing_mode_pb2.ProcessingMode:
    """What Envoy sends the pacer after the request headers (always sent); trailers of the
    request never."""
    return Mode(
        request_header_mode=Mode.SEND,
        response_header_mode=Mode.SEND if response_headers else Mode.SKIP,
        request_body_mode=request_body,
        response_body_mode=response_body,
        request_trailer_mode=Mode.SKIP,
        response_trailer_mode=Mode.SEND if response_trailers else Mode.SKIP,
    )


# an LLM route: the whole request body (model, ceiling), the response body as it streams (usage)
LLM_MODE = _mode(response_headers=True, request_body=Mode.BUFFERED, response_body=Mode.STREAMED)
# nothing to hold nor read: Envoy sends nothing more and closes the stream (one round trip)
DONE_MODE = _mode()
# an MCP tool route: the whole request body (strict reading, arguments), then nothing more
# (the stream ends with the body's answer) unless slots are held (`_with_trailers`)
MCP_MODE = _mode(request_body=Mode.BUFFERED)
# a tools/list: its answer's headers and whole body too, to filter it
MCP_LIST_MODE = _mode(
    response_headers=True, request_body=Mode.BUFFERED, response_body=Mode.BUFFERED
)
MCP_FILTER_METADATA = "envoy.filters.http.mcp"  # forwarded to the pacer (xds.pacing)
# in-flight caps: Envoy ends the stream after the last message it must send, so without a
# response body to read it would end at the response headers, long before the response does.
# Asking for response trailers keeps it open until the HTTP stream ends (Envoy 1.40 sends no
# trailers message when the response has none; it closes the stream at the filter's end).
HOLD_MODE = _mode(response_headers=True, response_trailers=True)


@dataclass(frozen=True)
class PacerSettings:
    store_timeout_s: float = 1.2  # one reserve call (the store has its own, shorter, timeouts)
    reservation_ttl_s: float = 900.0  # longer than any request: an unsettled one is charged
    timeout_margin_s: float = 2.0  # added to the longest wait when raising Envoy's timer


@dataclass
class _Request:
    """One HTTP request's pacing state, on the pacer's loop."""

    pace: spec.PaceSpec
    request_id: str = ""
    path: str = ""
    started: float = field(default_factory=time.monotonic)
    queued_ms: int = 0
    slots: list[Slot] = field(default_factory=list)
    reservation: str | None = None
    budgets: tuple[spec.BudgetSpec, ...] = ()  # those reserved
    llm: LlmRequest | None = None
    reader: UsageReader | None = None
    actual: dict[spec.Unit, int] | None = None  # the usage found, in every unit
    refused_budget: str | None = None
    status: int = 0  # the response's
    complete: bool = False  # the response ended normally (not cut)
    done: bool = False
    tools: ToolPolicy | None = None  # an MCP tool route's rules
    mcp_facts: RequestFacts | None = None  # set while the MCP body is awaited
    mcp_headers: tuple[tuple[str, str], ...] = ()
    checked: mcp.Checked | None = None  # the verdict on the MCP body
    list_mode: bool = False  # Envoy's MCP filter read a tools/list: its answer is asked for
    list_facts: RequestFacts | None = None  # an allowed tools/list: its answer is filtered
    listing: str | None = None  # that answer's content type, while its body is read
    list_encoded: bool = False  # that answer has a content-encoding (it was not asked for)
    shadow_tools: ToolPolicy | None = None  # shadow mode's tool rules (recorded, never acted on)
    shadow_refused: str = ""  # what they would have refused: "<code>: <reason>"


class ExternalProcessor:
    def __init__(
        self,
        store: LimitStore,
        limiter: Limiter,
        metrics: PacerMetrics,
        settings: PacerSettings | None = None,
    ) -> None:
        self._store = store
        self._limiter = limiter
        self._metrics = metrics
        self._settings = settings or PacerSettings()
        self._finishing: set[asyncio.Task[None]] = set()

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Process": grpc.stream_stream_rpc_method_handler(
                    self.Process,
                    request_deserializer=ep.ProcessingRequest.FromString,
                    response_serializer=ep.ProcessingResponse.SerializeToString,
                )
            },
        )

    async def Process(
        self, requests: AsyncIterator[ep.ProcessingRequest], context: Any
    ) -> AsyncIterator[ep.ProcessingResponse]:
        metadata = dict(context.invocation_metadata() or ())
        raw = metadata.get(spec.PACE_METADATA)
        try:
            pace = spec.decode(raw) if isinstance(raw, str) else None
        except ValueError as exc:
            log.warning("ext_proc stream refused: %s", exc)
            pace = None
        state = _Request(pace) if pace is not None else None
        if state is not None and state.pace.mcp is not None:
            try:
                state.tools = mcp.policy(state.pace.mcp)
                if state.pace.shadow_mcp is not None:
                    state.shadow_tools = mcp.policy(state.pace.shadow_mcp)
            except ValueError as exc:
                log.warning("ext_proc stream refused: %s", exc)
                state = None
        try:
            async for message in requests:
                if state is None:
                    self._metrics.decision(ADMISSION, refusals.PACE_SPEC_INVALID)
                    yield ep.ProcessingResponse(
                        immediate_response=refusals.refusal(
                            refusals.PACE_SPEC_INVALID,
                            "this route's pacing configuration is missing or unreadable",
                        )
                    )
                    return
                async for response in self._on(state, message):
                    yield response
                if state.done:
                    return
        finally:
            if state is not None:
                self._finish(state)

    async def _on(
        self, state: _Request, message: ep.ProcessingRequest
    ) -> AsyncIterator[ep.ProcessingResponse]:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            if state.tools is not None:
                envoy_read = message.metadata_context.filter_metadata.get(MCP_FILTER_METADATA)
                method = envoy_read.fields.get("method") if envoy_read is not None else None
                state.list_mode = method is not None and method.string_value == TOOLS_LIST
            async for r in self._request_headers(state, message.request_headers):
                yield r
        elif kind == "request_body":
            async for r in self._request_body(state, message.request_body):
                yield r
        elif kind == "response_headers":
            yield self._response_headers(state, message.response_headers)
        elif kind == "response_body":
            yield self._response_body(state, message.response_body)
        elif kind == "request_trailers":
            yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
        elif kind == "response_trailers":
            state.done = True
            yield ep.ProcessingResponse(
                response_trailers=ep.TrailersResponse(), dynamic_metadata=self._audit(state)
            )

    # request side

    async def _request_headers(
        self, state: _Request, headers: ep.HttpHeaders
    ) -> AsyncIterator[ep.ProcessingResponse]:
        values = _header_map(headers)
        state.request_id = values.get("x-request-id", "")
        state.path = values.get(":path", "")
        # a bodiless GET or HEAD (listing models, say) generates nothing: only request budgets
        # count it; every call that can generate has a body the reader must meter
        metered = not (headers.end_of_stream and values.get(":method") in ("GET", "HEAD"))
        if state.tools is not None:
            if not headers.end_of_stream:  # the body decides: ask for all of it
                state.mcp_facts = RequestFacts(
                    values.get(":method", ""), state.path, _plain_headers(values)
                )
                state.mcp_headers = _header_pairs(headers)
                mode = MCP_LIST_MODE if state.list_mode else MCP_MODE
                mode = LLM_MODE if state.pace.llm is not None else mode
                if state.pace.concurrency and state.pace.llm is None:
                    mode = _with_trailers(mode)
                answer = ep.HeadersResponse()
                if state.list_mode:  # the answer must be readable to be filtered: uncompressed
                    answer.response.header_mutation.remove_headers.append("accept-encoding")
                yield ep.ProcessingResponse(request_headers=answer, mode_override=mode)
                return
            if state.pace.mcp_refuse:  # the refusal route: never forwarded (it has a body)
                yield self._refuse(state, mcp.no_body())
                return
        if state.pace.llm is not None and metered:
            if headers.end_of_stream:  # no body: refused, the LLM reader says why
                read = read_request(state.pace.llm, b"", state.path)
                why = read if isinstance(read, Refusal) else None
                yield self._refuse(
                    state,
                    refusals.refusal(
                        why.reason if why else spec.BODY_UNREADABLE,
                        why.message if why else "an LLM call needs a JSON body",
                    ),
                )
                return
            # the body decides: ask for all of it (the filter must allow_mode_override)
            yield ep.ProcessingResponse(
                request_headers=ep.HeadersResponse(),
                mode_override=LLM_MODE,
            )
            return
        async for r in self._admit(state, {"requests": 1}):
            yield r
            if r.HasField("immediate_response"):
                return
        admitted = ep.ProcessingResponse(
            request_headers=ep.HeadersResponse(), dynamic_metadata=self._audit(state)
        )
        # slots are held to the response's end; otherwise nothing is left to do on this request
        admitted.mode_override.CopyFrom(HOLD_MODE if state.slots else DONE_MODE)
        yield admitted

    async def _request_body(
        self, state: _Request, body: ep.HttpBody
    ) -> AsyncIterator[ep.ProcessingResponse]:
        if state.mcp_facts is not None:
            async for r in self._read_mcp(state, body.body):
                yield r
            return
        llm = state.pace.llm
        if llm is None or state.llm is not None:  # not asked for: pass it on untouched
            yield ep.ProcessingResponse(request_body=ep.BodyResponse())
            return
        async for r in self._read_llm(state, llm, body.body):
            yield r

    async def _read_mcp(self, state: _Request, body: bytes) -> AsyncIterator[ep.ProcessingResponse]:
        assert state.tools is not None and state.mcp_facts is not None
        facts, state.mcp_facts = state.mcp_facts, None
        checked = mcp.check(state.tools, state.pace.mcp_refuse, facts, state.mcp_headers, body)
        state.checked = checked
        if state.shadow_tools is not None:
            state.shadow_refused = mcp.shadow_refusal(state.shadow_tools, checked, facts)
        if checked.refusal is not None:
            yield self._refuse(state, checked.refusal)
            return
        if checked.lists_tools:
            if not state.list_mode or state.pace.llm is not None:  # its answer is not read
                yield self._refuse(state, mcp.unlistable(checked))
                return
            state.list_facts = facts
        if state.pace.llm is not None:
            async for r in self._read_llm(state, state.pace.llm, body):
                yield r
            return
        async for r in self._admit(state, {"requests": 1}):
            yield r
            if r.HasField("immediate_response"):
                return
        yield ep.ProcessingResponse(
            request_body=ep.BodyResponse(), dynamic_metadata=self._audit(state)
        )

    async def _read_llm(
        self, state: _Request, llm: spec.LlmSpec, body: bytes
    ) -> AsyncIterator[ep.ProcessingResponse]:
        request = read_request(llm, body, state.path)
        if isinstance(request, Refusal):
            yield self._refuse(state, refusals.refusal(request.reason, request.message))
            return
        unpriced = request.cost_refusal(state.pace.budgets)
        if unpriced is not None:
            yield self._refuse(state, refusals.refusal(unpriced.reason, unpriced.message))
            return
        state.llm = request
        async for r in self._admit(state, request.most()):
            yield r
            if r.HasField("immediate_response"):
                return
        common = ep.CommonResponse()
        if request.rewritten:
            common.body_mutation.body = request.body
            common.header_mutation.set_headers.append(
                refusals.header("content-length", str(len(request.body)))
            )
        yield ep.ProcessingResponse(
            request_body=ep.BodyResponse(response=common), dynamic_metadata=self._audit(state)
        )

    async def _admit(
        self, state: _Request, most: Mapping[spec.Unit, int]
    ) -> AsyncIterator[ep.ProcessingResponse]:
        """Yields at most a timer extension, then a refusal if refused; nothing if admitted."""
        pace = state.pace
        extended = False
        first_wait: float | None = None
        for cap in pace.concurrency:
            slot = await self._limiter.acquire(cap, pace.agent, 0)
            if slot is None:
                now = time.monotonic()
                first_wait = now if first_wait is None else first_wait
                budget = cap.max_wait_ms / 1000 - (now - first_wait)
                if not extended:  # Envoy honours one extension per message: the longest
                    extended = True
                    longest = max(c.max_wait_ms for c in pace.concurrency) / 1000
                    yield ep.ProcessingResponse(
                        override_message_timeout=_duration(
                            longest + self._settings.timeout_margin_s
                        )
                    )
                slot = await self._limiter.acquire(cap, pace.agent, budget)
            if slot is None:
                waited = time.monotonic() - (first_wait or time.monotonic())
                state.queued_ms = round(waited * 1000)
                yield self._refuse(
                    state, refusals.queue_timeout(cap.key, waited, cap.max_wait_ms / 1000)
                )
                return
            state.slots.append(slot)
        if first_wait is not None:
            state.queued_ms = round((time.monotonic() - first_wait) * 1000)
        refusal = await self._reserve(state, most)
        if refusal is not None:
            yield self._refuse(state, refusal)
            return
        self._metrics.decision(ADMISSION, "admitted")

    async def _reserve(
        self, state: _Request, most: Mapping[spec.Unit, int]
    ) -> ep.ImmediateResponse | None:
        now = time.time()
        charges = []
        budgets = []
        for b in state.pace.budgets:
            amount = most.get(b.unit, 0)
            if amount <= 0:  # tokens and cost count LLM calls only
                continue
            start, end = spec.window_bounds(b.window, now)
            charges.append(Charge(b.id, b.limit, amount, start, end))
            budgets.append(b)
        if not charges:
            return None
        # an id of our own per request: an agent could send a reused x-request-id, and a
        # reserve of a known id returns its first answer without charging again
        reservation = f"{state.request_id or 'no-request-id'}/{uuid.uuid4().hex}"
        try:
            async with asyncio.timeout(self._settings.store_timeout_s):
                result = await self._store.reserve(
                    reservation, charges, self._settings.reservation_ttl_s
                )
        except (StoreUnavailable, TimeoutError) as exc:
            # the store may have held the charges before its answer was lost: give them back
            # (settling an id the store never saw changes nothing), or they would be charged
            # in full at expiry for a request that was refused or not counted
            self._spawn_settle(reservation, {b.id: 0 for b in budgets})
            closed = [b.id for b in budgets if b.on_store_failure == "closed"]
            if closed:
                state.refused_budget = closed[0]
                return refusals.refusal(
                    spec.STORE_UNAVAILABLE,
                    f"budget {closed[0]} cannot be checked now (limit store unavailable); "
                    "retry later",
                    retry_after_s=1,
                    budget=closed[0],
                )
            log.warning("budgets not counted for one request (failing open): %s", exc)
            return None
        for s in result.states:
            self._metrics.spent(s.budget, s.spent)
        if not result.admitted:
            state.refused_budget = result.refused
            refused = next((s for s in result.states if s.budget == result.refused), None)
            unit = next((b.unit for b in budgets if b.id == result.refused), "requests")
            if refused is None:  # a store that names no state: still refuse, say less
                return refusals.refusal(spec.OVER_BUDGET, f"budget {result.refused} is spent")
            return refusals.over_budget(refused, unit, now)
        state.reservation = reservation
        state.budgets = tuple(budgets)
        return None

    def _refuse(self, state: _Request, refusal: ep.ImmediateResponse) -> ep.ProcessingResponse:
        self._metrics.decision(ADMISSION, refusal.details)
        state.done = True
        return ep.ProcessingResponse(
            immediate_response=refusal, dynamic_metadata=self._audit(state)
        )

    # response side

    def _response_headers(self, state: _Request, headers: ep.HttpHeaders) -> ep.ProcessingResponse:
        if state.list_facts is not None and not headers.end_of_stream:
            values = _header_map(headers)
            if values.get(":status") == "200":  # a tools/list answer: filter its (whole) body
                state.listing = values.get("content-type", "")
                state.list_encoded = values.get("content-encoding", "identity") != "identity"
        llm = state.pace.llm
        if llm is not None and state.llm is not None:
            values = _header_map(headers)
            status = values.get(":status", "")
            state.status = int(status) if status.isdigit() else 0
            state.reader = UsageReader(
                llm.api, values.get("content-type", ""), values.get("content-encoding", "")
            )
        if headers.end_of_stream:
            state.done = state.complete = True
            return ep.ProcessingResponse(
                response_headers=ep.HeadersResponse(), dynamic_metadata=self._audit(state)
            )
        return ep.ProcessingResponse(response_headers=ep.HeadersResponse())

    def _response_body(self, state: _Request, body: ep.HttpBody) -> ep.ProcessingResponse:
        if state.listing is not None and state.list_facts is not None and state.tools is not None:
            assert state.checked is not None and state.checked.message is not None
            filtered = mcp.filter_answer(
                state.tools, state.list_facts, state.checked.message.id, state.listing, body.body
            )
            common = ep.CommonResponse()
            if filtered != body.body:
                common.body_mutation.body = filtered
                common.header_mutation.set_headers.append(
                    refusals.header("content-length", str(len(filtered)))
                )
                if state.list_encoded:  # unreadable, so replaced by a plain JSON-RPC error
                    common.header_mutation.remove_headers.append("content-encoding")
            state.listing = None
            if body.end_of_stream:
                state.done = state.complete = True
            return ep.ProcessingResponse(
                response_body=ep.BodyResponse(response=common), dynamic_metadata=self._audit(state)
            )
        if state.reader is not None:
            state.reader.feed(body.body)
        if body.end_of_stream:
            state.done = state.complete = True
            return ep.ProcessingResponse(
                response_body=ep.BodyResponse(), dynamic_metadata=self._audit(state)
            )
        return ep.ProcessingResponse(response_body=ep.BodyResponse())

    def _audit(self, state: _Request) -> struct_pb2.Struct:
        """What the access log records (namespace spec.DYNAMIC_METADATA_NAMESPACE), sent with
        every answer that knows more (Envoy merges them): the usage read so far is taken once
        the reader is done, at the response's last message."""
        fields: dict[str, Any] = {"queued_ms": state.queued_ms}
        if state.checked is not None:
            fields.update(state.checked.audit())
        if state.refused_budget:
            fields["budget"] = state.refused_budget
        if state.shadow_refused:
            fields["shadow_refused"] = state.shadow_refused
        if state.llm is not None:
            fields["model"] = state.llm.model
            usage = self._usage(state)
            if usage is not None:
                tokens_in, tokens_out, cost = usage
                fields.update(tokens_in=tokens_in, tokens_out=tokens_out)
                if cost is not None:
                    fields["cost_micro_usd"] = cost
        out = struct_pb2.Struct()
        out.get_or_create_struct(spec.DYNAMIC_METADATA_NAMESPACE).update(fields)
        return out

    def _usage(self, state: _Request) -> tuple[int, int, int | None] | None:
        if state.reader is None or state.llm is None:
            return None
        report = state.reader.finish()
        state.reader = None
        if report.usage is not None:
            tin, tout = report.usage.input_tokens, report.usage.output_tokens
        elif state.complete and 400 <= state.status < 500:
            # the provider refused the call (bad request, auth, its own rate limit): nothing
            # was generated. A 5xx may come after work was done (or be Envoy's timeout while
            # the provider generates), so it is charged in full like a stream cut short.
            tin, tout = 0, 0
        else:
            return None
        amounts = state.llm.spent(tin, tout)
        state.actual = dict(amounts)
        return tin, tout, amounts.get("cost_micro_usd")

    # the end, however it came

    def _finish(self, state: _Request) -> None:
        for slot in state.slots:
            slot.release()
        state.slots.clear()
        if state.reservation is None:
            return
        if state.reader is not None:  # ended before the last body chunk: usage so far
            self._usage(state)
        amounts = state.actual or {}
        actual = {b.id: amounts[b.unit] for b in state.budgets if b.unit in amounts}
        self._spawn_settle(state.reservation, actual)
        state.reservation = None

    def _spawn_settle(self, reservation: str, actual: dict[str, int]) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(reservation, actual))
        self._finishing.add(task)  # not cancelled with the stream; kept until done
        task.add_done_callback(self._finishing.discard)

    async def _settle(self, reservation: str, actual: dict[str, int]) -> None:
        """Settling is idempotent, so a store blip is retried a few times; after that the
        reservation expires and is charged in full: never under-charged."""
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                async with asyncio.timeout(self._settings.store_timeout_s):
                    await self._store.settle(reservation, actual)
                return
            except (StoreUnavailable, TimeoutError) as exc:
                if attempt == SETTLE_ATTEMPTS:
                    log.warning("settle of %s failed (%s): charged in full", reservation, exc)
                    return
                await asyncio.sleep(SETTLE_BACKOFF.delay(attempt))

    async def drain(self) -> None:
        """Wait for settles under way (shutdown)."""
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._finishing, return_exceptions=True)


def _header_map(headers: ep.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        out[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _header_pairs(headers: ep.HttpHeaders) -> tuple[tuple[str, str], ...]:
    """Every header line as sent (a repeated header stays repeated)."""
    return tuple(
        (h.key.lower(), h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
        for h in headers.headers.headers
    )


def _plain_headers(values: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in values.items() if not k.startswith(":")}


def _with_trailers(
    mode: processing_mode_pb2.ProcessingMode,
) -> processing_mode_pb2.ProcessingMode:
    """Keeps the stream to the response's end, so in-flight slots are held that long."""
    out = Mode()
    out.CopyFrom(mode)
    out.response_header_mode = Mode.SEND
    out.response_trailer_mode = Mode.SEND
    return out


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(round(seconds * 1000))
    return d

"""The external processor over gRPC, as Envoy drives it: one stream per HTTP request."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format
from pacer_twins import FlakyStore

from meshgate.pacer import ext_proc
from meshgate.pacer.ext_proc import DONE_MODE, HOLD_MODE, LLM_MODE
from meshgate.pacer.service import Pacer
from meshgate.pacing import spec
from meshgate.pacing.store import StoreUnavailable
from meshgate.retry import Backoff


class Stream:
    """One ext_proc stream from the test's side (Envoy's)."""

    def __init__(self, channel: grpc.aio.Channel, pace: spec.PaceSpec | str | None) -> None:
        method = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=ep.ProcessingRequest.SerializeToString,
            response_deserializer=ep.ProcessingResponse.FromString,
        )
        metadata: list[tuple[str, str]] = []
        if pace is not None:
            text = pace if isinstance(pace, str) else spec.encode(pace)
            metadata.append((spec.PACE_METADATA, text))
        self.call = method(metadata=metadata)

    async def send(self, request: ep.ProcessingRequest) -> None:
        await self.call.write(request)

    async def recv(self, timeout: float = 5) -> ep.ProcessingResponse:
        got = await asyncio.wait_for(self.call.read(), timeout)
        assert isinstance(got, ep.ProcessingResponse), got
        return got

    async def headers(
        self, end: bool = False, path: str = "/", **extra: str
    ) -> ep.ProcessingResponse:
        values = {":method": "POST", ":path": path, "x-request-id": "req-1", **extra}
        await self.send(ep.ProcessingRequest(request_headers=http_headers(values, end)))
        return await self.recv()

    async def end(self) -> None:
        await self.call.done_writing()


def http_headers(values: dict[str, str], end: bool = False) -> ep.HttpHeaders:
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
        ),
        end_of_stream=end,
    )


def pacer_metadata(r: ep.ProcessingResponse) -> dict[str, object]:
    data = json_format.MessageToDict(r.dynamic_metadata)
    return data.get(spec.DYNAMIC_METADATA_NAMESPACE, {})  # type: ignore[no-any-return]


def error_of(r: ep.ProcessingResponse) -> dict[str, object]:
    assert r.HasField("immediate_response"), r
    return json.loads(r.immediate_response.body)["error"]  # type: ignore[no-any-return]


async def until(check: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.01)


def cap(key: str = "dest", max_: int = 1, wait_ms: int = 2000) -> spec.ConcurrencySpec:
    return spec.ConcurrencySpec(key, max_, wait_ms, fair=True)


def held(agent: str = "a", **kw: object) -> spec.PaceSpec:
    return spec.PaceSpec(agent, "dest", **kw)  # type: ignore[arg-type]


CHAT = "/v1/chat/completions"
LLM = spec.LlmSpec("openai", ("gpt-4o-mini",), 100, (spec.Price("*", "0.15", "0.60"),))


async def test_no_spec_or_a_bad_one_is_refused(channel: grpc.aio.Channel) -> None:
    for pace in (None, "{not json", json.dumps({"agent": "a"})):
        r = await Stream(channel, pace).headers()
        assert r.immediate_response.status.code == 500
        assert r.immediate_response.details == "pace_spec_invalid"
        assert error_of(r)["type"] == "pace_spec_invalid"


async def test_nothing_to_pace_is_admitted_without_holding_the_stream(
    channel: grpc.aio.Channel,
) -> None:
    r = await Stream(channel, held()).headers()
    assert r.HasField("request_headers") and r.mode_override == DONE_MODE


async def test_a_slot_is_held_for_the_stream_and_released_at_its_end(
    channel: grpc.aio.Channel, pacer: Pacer
) -> None:
    s = Stream(channel, held(concurrency=(cap(),)))
    r = await s.headers()
    assert r.HasField("request_headers")
    assert r.mode_override == HOLD_MODE  # keeps Envoy's stream open to the response's end
    assert pacer_metadata(r) == {"queued_ms": 0.0}
    assert pacer.limiter.in_flight("dest") == 1
    await s.send(ep.ProcessingRequest(response_headers=http_headers({":status": "200"})))
    await s.recv()
    assert pacer.limiter.in_flight("dest") == 1  # the body is still coming
    await s.end()
    await until(lambda: pacer.limiter.in_flight("dest") == 0)


async def test_a_waiter_first_raises_envoys_timer_then_is_admitted(
    channel: grpc.aio.Channel, pacer: Pacer
) -> None:
    first = Stream(channel, held(concurrency=(cap(wait_ms=3000),)))
    await first.headers()
    second = Stream(channel, held("b", concurrency=(cap(wait_ms=3000),)))
    await second.send(ep.ProcessingRequest(request_headers=http_headers({":path": "/"})))
    extend = await second.recv()
    assert extend.override_message_timeout.ToMilliseconds() == 5000  # maxWait + margin
    assert not extend.HasField("request_headers")
    await until(lambda: pacer.limiter.waiting("dest") == 1)
    await asyncio.sleep(0.3)
    await first.end()
    admitted = await second.recv()
    assert admitted.HasField("request_headers")
    assert float(pacer_metadata(admitted)["queued_ms"]) >= 250  # type: ignore[arg-type]


async def test_queue_timeout_says_how_long_it_waited(
    channel: grpc.aio.Channel, pacer: Pacer
) -> None:
    await Stream(channel, held(concurrency=(cap(wait_ms=200),))).headers()
    s = Stream(channel, held(concurrency=(cap(wait_ms=200),)))
    await s.send(ep.ProcessingRequest(request_headers=http_headers({":path": "/"})))
    assert (await s.recv()).HasField("override_message_timeout")
    r = await s.recv()
    assert r.immediate_response.status.code == 503
    assert r.immediate_response.details == spec.QUEUE_TIMEOUT
    error = error_of(r)
    assert 150 <= int(error["waited_ms"]) < 1000  # type: ignore[call-overload]
    assert error["max_wait_ms"] == 200
    headers = {h.header.key: h.header.raw_value for h in r.immediate_response.headers.set_headers}
    assert headers["retry-after"] == b"1"
    assert pacer.limiter.waiting("dest") == 0


async def test_caps_in_order_the_second_waits_within_its_own_max_wait(
    channel: grpc.aio.Channel, pacer: Pacer
) -> None:
    caps = (cap("agent", 2, 5000), cap("dest", 1, 300))
    await Stream(channel, held(concurrency=caps)).headers()
    s = Stream(channel, held(concurrency=caps))
    await s.send(ep.ProcessingRequest(request_headers=http_headers({":path": "/"})))
    assert (await s.recv()).override_message_timeout.ToMilliseconds() == 7000
    r = await s.recv()
    assert error_of(r)["queue"] == "dest"
    # the slot taken on the first cap was given back
    await until(lambda: pacer.limiter.in_flight("agent") == 1)


async def test_envoy_going_away_while_waiting_leaks_nothing(
    channel: grpc.aio.Channel, pacer: Pacer
) -> None:
    first = Stream(channel, held(concurrency=(cap(),)))
    await first.headers()
    waiter = Stream(channel, held(concurrency=(cap(),)))
    await waiter.send(ep.ProcessingRequest(request_headers=http_headers({":path": "/"})))
    await waiter.recv()
    await until(lambda: pacer.limiter.waiting("dest") == 1)
    waiter.call.cancel()  # the client went away: Envoy resets the stream
    await until(lambda: pacer.limiter.waiting("dest") == 0)
    await first.end()
    await until(lambda: pacer.limiter.keys() == 0)


async def test_over_budget_names_the_budget_and_when_it_resets(
    channel: grpc.aio.Channel, store: FlakyStore
) -> None:
    pace = held(budgets=(spec.BudgetSpec("agent/a/b", "requests", 1, "hour"),))
    ok = Stream(channel, pace)
    assert (await ok.headers()).HasField("request_headers")
    assert store.reserved == {"agent/a/b": 1}
    refused = await Stream(channel, pace).headers()
    assert refused.immediate_response.status.code == 429
    error = error_of(refused)
    assert (error["budget"], error["spent"], error["reserved"], error["limit"]) == (
        "agent/a/b",
        0,
        1,
        1,
    )
    _, end = spec.window_bounds("hour", time.time())
    headers = {
        h.header.key: h.header.raw_value for h in refused.immediate_response.headers.set_headers
    }
    assert abs(int(headers["retry-after"]) - (end - time.time())) <= 2
    assert pacer_metadata(refused)["budget"] == "agent/a/b"
    await ok.end()
    await until(lambda: store.spent.get("agent/a/b") == 1 and store.reserved["agent/a/b"] == 0)


async def test_reservation_ids_are_ours_even_when_the_agent_reuses_x_request_id(
    channel: grpc.aio.Channel, store: FlakyStore
) -> None:
    pace = held(budgets=(spec.BudgetSpec("agent/a/b", "requests", 5, "hour"),))
    for _ in range(3):
        s = Stream(channel, pace)
        await s.headers(**{"x-request-id": "same"})
        await s.end()
    await until(lambda: store.spent.get("agent/a/b") == 3)
    assert all(r.startswith("same/") for r in store.settled)


async def test_store_down_closed_budget_refuses_open_one_admits(
    channel: grpc.aio.Channel, store: FlakyStore
) -> None:
    store.down = True
    closed = held(budgets=(spec.BudgetSpec("c", "requests", 5, "day", "closed"),))
    r = await Stream(channel, closed).headers()
    assert r.immediate_response.status.code == 503
    assert r.immediate_response.details == spec.STORE_UNAVAILABLE
    opened = held(budgets=(spec.BudgetSpec("o", "requests", 5, "day", "open"),))
    assert (await Stream(channel, opened).headers()).HasField("request_headers")


async def test_a_reservation_whose_answer_was_lost_is_given_back(
    channel: grpc.aio.Channel, store: FlakyStore
) -> None:
    """The store held the charge, then its answer was lost (a timeout): the request is refused
    (fail closed) and the charge is released, not kept until expiry for a refused request."""
    reserve = store.reserve

    async def held_then_lost(*args: Any, **kwargs: Any) -> Any:
        await reserve(*args, **kwargs)
        raise StoreUnavailable("the answer was lost")

    store.reserve = held_then_lost  # type: ignore[method-assign]
    pace = held(budgets=(spec.BudgetSpec("one", "requests", 1, "day", "closed"),))
    r = await Stream(channel, pace).headers()
    assert r.immediate_response.details == spec.STORE_UNAVAILABLE
    store.reserve = reserve  # type: ignore[method-assign]
    await until(lambda: not store.open)  # given back
    again = await Stream(channel, pace).headers()
    assert again.HasField("request_headers"), again  # the budget's one request is still there


async def test_a_tokens_budget_does_not_count_a_plain_request(
    channel: grpc.aio.Channel, store: FlakyStore
) -> None:
    pace = held(budgets=(spec.BudgetSpec("t", "tokens", 5, "day"),))
    assert (await Stream(channel, pace).headers()).HasField("request_headers")
    assert store.reserved == {}


def llm_pace(**kw: object) -> spec.PaceSpec:
    return held(
        budgets=(spec.BudgetSpec("agent/a/tok", "tokens", 100_000, "day"),),
        concurrency=(cap("llm", 2),),
        llm=LLM,
        **kw,
    )


async def start_llm(s: Stream, body: dict[str, object]) -> ep.ProcessingResponse:
    r = await s.headers(path=CHAT)
    assert r.mode_override == LLM_MODE
    raw = json.dumps(body).encode()
    await s.send(ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True)))
    return await s.recv()


async def test_llm_stream_is_read_for_usage_and_settled(
    channel: grpc.aio.Channel, store: FlakyStore, pacer: Pacer
) -> None:
    s = Stream(channel, llm_pace())
    r = await start_llm(s, {"model": "gpt-4o-mini", "stream": True})
    mutation = r.request_body.response
    forwarded = json.loads(mutation.body_mutation.body)
    assert forwarded["max_completion_tokens"] == 100  # the route's ceiling, injected
    assert forwarded["stream_options"] == {"include_usage": True}  # the usage, asked for
    (length,) = mutation.header_mutation.set_headers
    assert length.header.raw_value == str(len(mutation.body_mutation.body)).encode()
    assert pacer_metadata(r)["model"] == "gpt-4o-mini"
    (reserved,) = store.reserved.values()
    assert reserved > 100  # input bound + the ceiling
    await s.send(
        ep.ProcessingRequest(
            response_headers=http_headers({":status": "200", "content-type": "text/event-stream"})
        )
    )
    await s.recv()
    usage = {"prompt_tokens": 9, "completion_tokens": 4}
    for chunk, end in ((b'data: {"choices":[]}\n\n', False), (sse(usage), True)):
        await s.send(ep.ProcessingRequest(response_body=ep.HttpBody(body=chunk, end_of_stream=end)))
        last = await s.recv()
    assert pacer_metadata(last) == {
        "queued_ms": 0.0,
        "model": "gpt-4o-mini",
        "tokens_in": 9.0,
        "tokens_out": 4.0,
        "cost_micro_usd": 4.0,  # ceil(9 * 0.15 + 4 * 0.6)
    }
    await until(lambda: store.spent.get("agent/a/tok") == 13)
    assert store.reserved["agent/a/tok"] == 0
    await until(lambda: pacer.limiter.in_flight("llm") == 0)


def sse(usage: dict[str, int]) -> bytes:
    return f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode()


async def test_llm_stream_cut_short_is_charged_in_full(
    channel: grpc.aio.Channel, store: FlakyStore, pacer: Pacer
) -> None:
    s = Stream(channel, llm_pace())
    await start_llm(s, {"model": "gpt-4o-mini", "max_tokens": 20})
    (reserved,) = store.reserved.values()
    await s.send(
        ep.ProcessingRequest(
            response_headers=http_headers({":status": "200", "content-type": "text/event-stream"})
        )
    )
    await s.recv()
    s.call.cancel()  # the client went away mid-response
    await until(lambda: store.spent.get("agent/a/tok") == reserved)
    assert store.reserved["agent/a/tok"] == 0
    assert pacer.limiter.in_flight("llm") == 0


async def test_llm_refusals_hold_nothing(
    channel: grpc.aio.Channel, store: FlakyStore, pacer: Pacer
) -> None:
    for body, code, reason in (
        ({"model": "gpt-5"}, 403, spec.MODEL_NOT_ALLOWED),
        ({"model": "gpt-4o-mini", "max_tokens": 101}, 400, spec.MAX_TOKENS_EXCEEDED),
    ):
        r = await start_llm(Stream(channel, llm_pace()), body)
        assert r.immediate_response.status.code == code
        assert r.immediate_response.details == reason
    no_body = await Stream(channel, llm_pace()).headers(end=True, path=CHAT)
    assert no_body.immediate_response.details == spec.BODY_UNREADABLE
    assert store.reserved == {} and pacer.limiter.keys() == 0


async def test_a_cost_budget_refuses_an_unpriced_model(channel: grpc.aio.Channel) -> None:
    unpriced = spec.LlmSpec("openai", (), 100, (spec.Price("gpt-4o*", "1", "1"),))
    pace = held(
        budgets=(spec.BudgetSpec("agent/a/usd", "cost_micro_usd", 10**6, "day"),), llm=unpriced
    )
    r = await start_llm(Stream(channel, pace), {"model": "claude-x"})
    assert r.immediate_response.details == spec.MODEL_NOT_ALLOWED
    assert "price" in str(error_of(r)["message"])


async def test_settle_is_retried_through_a_store_blip(
    channel: grpc.aio.Channel, store: FlakyStore
) -> None:
    pace = held(budgets=(spec.BudgetSpec("b", "requests", 5, "day"),))
    s = Stream(channel, pace)
    await s.headers()
    store.down = True
    await s.end()
    await asyncio.sleep(0.15)
    assert store.reserved == {"b": 1}  # not settled yet
    store.down = False
    await until(lambda: store.spent.get("b") == 1 and store.reserved["b"] == 0)


async def test_settle_failing_for_good_leaves_the_reservation_to_expire(
    channel: grpc.aio.Channel, store: FlakyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ext_proc, "SETTLE_BACKOFF", Backoff(0.01, 0.02))
    pace = held(budgets=(spec.BudgetSpec("b", "requests", 5, "day"),))
    s = Stream(channel, pace)
    await s.headers()
    store.down = True
    await s.end()
    await asyncio.sleep(0.5)
    assert store.reserved == {"b": 1} and len(store.open) == 1  # charged in full at its ttl
    store.down = False
    assert (await Stream(channel, pace).headers()).HasField("request_headers")  # still serving


async def test_hundreds_of_queued_streams_are_all_waiting_then_all_served(
    channel: grpc.aio.Channel, pacer: Pacer
) -> None:
    pace = held(concurrency=(cap("busy", 1, 20_000),))
    first = Stream(channel, pace)
    await first.headers()
    waiters = [Stream(channel, pace) for _ in range(300)]
    for w in waiters:
        await w.send(ep.ProcessingRequest(request_headers=http_headers({":path": "/"})))
    await until(lambda: pacer.limiter.waiting("busy") == 300, timeout=20)
    most = 0

    async def served(w: Stream) -> None:
        nonlocal most
        assert (await w.recv()).HasField("override_message_timeout")
        assert (await w.recv(timeout=20)).HasField("request_headers")
        most = max(most, pacer.limiter.in_flight("busy"))
        await w.end()

    await first.end()  # each is admitted as the one before ends
    await asyncio.gather(*(served(w) for w in waiters))
    assert most == 1
    await until(lambda: pacer.limiter.keys() == 0)


async def provider_answers(s: Stream, status: str, body: bytes, end: bool = True) -> None:
    headers = {":status": status, "content-type": "application/json"}
    await s.send(ep.ProcessingRequest(response_headers=http_headers(headers)))
    await s.recv()
    await s.send(ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=end)))
    await s.recv()


async def test_a_provider_refusal_charges_the_request_not_the_tokens(
    channel: grpc.aio.Channel, store: FlakyStore
) -> None:
    s = Stream(channel, llm_pace())
    await start_llm(s, {"model": "gpt-4o-mini", "max_tokens": 20})
    await provider_answers(s, "429", b'{"error": {"type": "rate_limit_exceeded"}}')
    await until(lambda: store.reserved.get("agent/a/tok") == 0)
    assert store.spent["agent/a/tok"] == 0
    (actual,) = store.settled.values()
    assert actual == {"agent/a/tok": 0}


async def test_a_provider_error_without_usage_is_charged_in_full(
    channel: grpc.aio.Channel, store: FlakyStore
) -> None:
    s = Stream(channel, llm_pace())
    await start_llm(s, {"model": "gpt-4o-mini", "max_tokens": 20})
    (reserved,) = store.reserved.values()
    await provider_answers(s, "503", b'{"error": "overloaded"}')
    await until(lambda: store.spent.get("agent/a/tok") == reserved)

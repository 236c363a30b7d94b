from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.pacing import spec
from meshgate.pacing.llm_request import (
    CHAT,
    COUNT_TOKENS,
    DEFAULT_MAX_TOKENS,
    EMBEDDINGS,
    MAX_MEMBERS,
    MEDIA_ALLOWANCE_TOKENS,
    RESPONSES,
    TOOLS_ALLOWANCE_TOKENS,
    Endpoint,
    LlmRequest,
    Refusal,
    endpoint_for,
    read_request,
)
from meshgate.pacing.llm_request import MESSAGES as MESSAGES_CALL

PRICES = (spec.Price("gpt-4o-mini*", "0.15", "0.60"), spec.Price("claude-*", "3", "15"))
OPENAI = spec.LlmSpec("openai", ("gpt-4o-mini*", "gpt-4.1"), 1024, PRICES)
ANTHROPIC = spec.LlmSpec("anthropic", ("claude-*",), 2048, PRICES)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, **fields}).encode()


def admitted(llm: spec.LlmSpec, raw: bytes) -> LlmRequest:
    result = read_request(llm, raw)
    assert isinstance(result, LlmRequest), result
    return result


def refused(llm: spec.LlmSpec, raw: bytes) -> Refusal:
    result = read_request(llm, raw)
    assert isinstance(result, Refusal), result
    return result


def sent(request: LlmRequest) -> dict[str, Any]:
    return dict(json.loads(request.body))


def test_a_request_within_the_rules_is_forwarded_as_sent() -> None:
    raw = body(max_completion_tokens=500)
    request = admitted(OPENAI, raw)
    assert (request.model, request.stream, request.rewritten) == ("gpt-4o-mini", False, False)
    assert request.body is raw
    assert request.max_input_tokens == len(raw)
    assert request.max_output_tokens == 500
    assert request.most() == {
        "requests": 1,
        "input_tokens": len(raw),
        "output_tokens": 500,
        "tokens": len(raw) + 500,
        "cost_micro_usd": -(-(len(raw) * 15 + 500 * 60) // 100),  # ceil, in integers
    }


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4.1-mini", "GPT-4O-MINI", "claude-3"])
def test_models_outside_the_globs_are_refused_by_name(model: str) -> None:
    refusal = refused(OPENAI, body(model=model))
    assert refusal.reason == spec.MODEL_NOT_ALLOWED
    assert repr(model) in refusal.message and "gpt-4o-mini*" in refusal.message


def test_no_model_rule_allows_any_model() -> None:
    assert admitted(spec.LlmSpec("openai"), body(model="o3-pro")).model == "o3-pro"


@pytest.mark.parametrize(
    "fields",
    [
        {"max_completion_tokens": 1025},
        {"max_tokens": 4000},
        {"max_tokens": 2000, "max_completion_tokens": 10},  # the larger of both is checked
        {"max_completion_tokens": 2000, "max_tokens": None},
    ],
)
def test_openai_ceiling_above_the_route_is_refused(fields: dict[str, Any]) -> None:
    refusal = refused(OPENAI, body(**fields))
    assert refusal.reason == spec.MAX_TOKENS_EXCEEDED
    assert "1024" in refusal.message
    assert str(max(v for v in fields.values() if v)) in refusal.message


def test_openai_ceiling_at_the_route_limit_is_admitted_unchanged() -> None:
    request = admitted(OPENAI, body(max_tokens=1024, max_completion_tokens=100))
    assert not request.rewritten and request.max_output_tokens == 1024


def test_openai_missing_ceiling_is_injected() -> None:
    request = admitted(OPENAI, body())
    assert request.rewritten and sent(request)["max_completion_tokens"] == 1024
    assert request.max_output_tokens == 1024
    assert request.max_input_tokens == len(body())  # the original size: our bytes are no input


def test_openai_null_ceiling_is_replaced_not_duplicated() -> None:
    request = admitted(OPENAI, body(max_completion_tokens=None))
    assert request.body.count(b"max_completion_tokens") == 1
    assert sent(request)["max_completion_tokens"] == 1024


def test_no_ceiling_anywhere_injects_the_default() -> None:
    request = admitted(spec.LlmSpec("openai"), body())
    assert sent(request)["max_completion_tokens"] == DEFAULT_MAX_TOKENS
    assert request.max_output_tokens == DEFAULT_MAX_TOKENS
    anthropic = admitted(spec.LlmSpec("anthropic"), body(model="claude-x"))
    assert sent(anthropic)["max_tokens"] == DEFAULT_MAX_TOKENS


def test_openai_n_choices_multiply_the_output_bound() -> None:
    assert admitted(OPENAI, body(n=3, max_tokens=100)).max_output_tokens == 300


def test_openai_prediction_adds_its_size_to_the_output_bound() -> None:
    prediction = {"type": "content", "content": "x = 1\n" * 50}
    request = admitted(OPENAI, body(prediction=prediction, max_tokens=100))
    assert request.max_output_tokens == 100 + len(json.dumps(prediction))


def test_openai_stream_asks_for_usage() -> None:
    request = admitted(OPENAI, body(stream=True, max_tokens=10))
    assert request.stream
    assert sent(request)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"include_usage": False}, {"include_usage": True}),
        ({"include_obfuscation": False}, {"include_obfuscation": False, "include_usage": True}),
        (None, {"include_usage": True}),
    ],
)
def test_openai_stream_options_keep_what_the_agent_set(
    options: dict[str, Any] | None, expected: dict[str, Any]
) -> None:
    request = admitted(OPENAI, body(stream=True, stream_options=options, max_tokens=10))
    assert request.body.count(b"stream_options") == 1
    assert sent(request)["stream_options"] == expected


def test_openai_stream_already_asking_for_usage_is_unchanged() -> None:
    raw = body(stream=True, stream_options={"include_usage": True}, max_tokens=10)
    assert admitted(OPENAI, raw).body is raw


def test_openai_non_streamed_stream_options_are_left_alone() -> None:
    raw = body(stream=False, stream_options={"include_usage": False}, max_tokens=10)
    assert admitted(OPENAI, raw).body is raw


def test_anthropic_max_tokens() -> None:
    raw = body(model="claude-sonnet-4-5", max_tokens=2048, stream=True)
    request = admitted(ANTHROPIC, raw)
    assert request.body is raw and request.stream and request.max_output_tokens == 2048
    refusal = refused(ANTHROPIC, body(model="claude-sonnet-4-5", max_tokens=2049))
    assert refusal.reason == spec.MAX_TOKENS_EXCEEDED and "2049" in refusal.message
    injected = admitted(ANTHROPIC, body(model="claude-sonnet-4-5"))
    assert sent(injected)["max_tokens"] == 2048 and "max_completion_tokens" not in sent(injected)


def test_anthropic_ignores_openai_fields() -> None:
    """`max_completion_tokens` means nothing to Anthropic: the ceiling is still injected."""
    raw = body(model="claude-x", max_completion_tokens=99999, n=5, stream=True)
    request = admitted(ANTHROPIC, raw)
    assert sent(request)["max_tokens"] == 2048 and request.max_output_tokens == 2048
    assert "stream_options" not in sent(request)


def test_odd_type_values_are_not_media() -> None:
    raw = body(messages=[{"type": []}, {"type": {"a": 1}}, {"type": None}], max_tokens=5)
    assert admitted(OPENAI, raw).max_input_tokens == len(raw)


def test_media_parts_and_anthropic_tools_add_allowances() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    content = [{"type": "text", "text": "What is this?"}, image, image]
    raw = body(messages=[{"role": "user", "content": content}], max_tokens=5)
    assert admitted(OPENAI, raw).max_input_tokens == len(raw) + 2 * MEDIA_ALLOWANCE_TOKENS
    source = {"type": "url", "url": "https://example.com/a.pdf"}
    tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
    raw = body(
        model="claude-x",
        max_tokens=5,
        tools=[tool],
        messages=[{"role": "user", "content": [{"type": "document", "source": source}]}],
    )
    expected = len(raw) + MEDIA_ALLOWANCE_TOKENS + TOOLS_ALLOWANCE_TOKENS
    assert admitted(ANTHROPIC, raw).max_input_tokens == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'"gpt-4o-mini"',
        b"null",
        b"{",
        b'{"model":"gpt-4o-mini"',
        b'{"model":"gpt-4o-mini",}',
        b'{"model":"gpt-4o-mini"}{}',
        b'{"model":"gpt-4o-mini"} 1',
        b'{"model":"gpt-4o-mini","model":"gpt-4.1"}',  # which one would the provider take?
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","role":"system"}]}',
        b'{"model":"gpt-4o-mini","temperature":NaN}',
        b'{"model":"gpt-4o-mini","temperature":Infinity}',
        b"\xef\xbb\xbf{}",  # a byte-order mark
        '{"model":"gpt-4o-mini"}'.encode("utf-16"),
        b'{"model":"gpt-4o-mini\xff"}',
        b'{"model":"gpt-4o-mini","x":"a\x01b"}',  # a raw control character in a string
        b"{" * 100_000 + b"}" * 100_000,
        b'{"model":"gpt-4o-mini","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
)
def test_unreadable_bodies_are_refused(raw: bytes) -> None:
    assert refused(spec.LlmSpec("openai"), raw).reason == spec.BODY_UNREADABLE


@pytest.mark.parametrize(
    "fields",
    [
        {"model": 4},
        {"model": ""},
        {"model": ["gpt-4o-mini"]},
        {"model": None},
        {"stream": "true"},
        {"stream": 1},
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"max_tokens": 10.0},
        {"max_tokens": "10"},
        {"max_tokens": True},
        {"max_completion_tokens": 1e3},
        {"n": 0},
        {"n": "2"},
        {"stream": True, "stream_options": "include_usage"},
        {"stream": True, "stream_options": {"include_usage": False, "x": 1e400}},
    ],
)
def test_mistyped_fields_are_refused(fields: dict[str, Any]) -> None:
    raw = json.dumps({"model": "gpt-4o-mini", **fields}).encode()
    raw = raw.replace(b"Infinity", b"1e400")  # a float JSON allows that Python reads as inf
    refusal = refused(spec.LlmSpec("openai"), raw)
    assert refusal.reason == spec.BODY_UNREADABLE
    assert next(iter(fields)) in refusal.message


def test_whitespace_and_escapes_survive_a_rewrite() -> None:
    raw = (
        b'\n { "model" : "gpt-4o-mini" ,\t"stream":true ,"messages" : [ {"role":"user",'
        b'"content":"caf\\u00e9 \\ud83d\\ude00 \xe2\x82\xac \\"q\\""} ] ,\r\n'
        b'"stream_options" : { "include_usage" : false } , "max_tokens" : null }  \n'
    )
    request = admitted(OPENAI, raw)
    out = sent(request)
    assert out["messages"] == json.loads(raw)["messages"]
    assert out["stream_options"] == {"include_usage": True}
    assert out["max_completion_tokens"] == 1024 and out["max_tokens"] is None
    # everything the agent wrote outside the replaced value is forwarded byte for byte
    assert request.body.startswith(raw.split(b'{ "include_usage"')[0])
    assert b'\\ud83d\\ude00 \xe2\x82\xac \\"q\\"' in request.body


def test_an_unpriced_model_has_no_cost() -> None:
    request = admitted(spec.LlmSpec("openai", prices=PRICES), body(model="gpt-4.1"))
    assert request.price is None and "cost_micro_usd" not in request.most()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    extra=st.dictionaries(
        st.text(max_size=12).filter(
            lambda k: (
                k not in {"model", "stream", "max_tokens", "max_completion_tokens", "n"}
                and k not in {"stream_options", "prediction"}
            )
        ),
        JSON_VALUES,
        max_size=5,
    ),
    stream=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
)
def test_rewrites_only_add_what_they_say(
    extra: dict[str, Any], stream: bool, indent: int | None
) -> None:
    doc = {"model": "gpt-4o-mini", **extra, "stream": stream}
    raw = json.dumps(doc, indent=indent, ensure_ascii=False).encode()
    request = admitted(OPENAI, raw)
    out = sent(request)
    expected = {**doc, "max_completion_tokens": 1024}
    if stream:
        expected["stream_options"] = {"include_usage": True}
    assert out == expected
    assert request.max_input_tokens >= len(raw)


SPECIAL = st.sampled_from(
    ["model", "stream", "max_tokens", "max_completion_tokens", "n", "stream_options", "x"]
)
WRITABLE = {"max_tokens", "max_completion_tokens", "stream_options"}


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(SPECIAL, JSON_VALUES | st.floats(), max_size=6),
    api=st.sampled_from(["openai", "anthropic"]),
)
def test_any_object_is_admitted_or_refused_never_an_error(
    fields: dict[str, Any], api: spec.LlmApi
) -> None:
    raw = json.dumps(fields).encode()
    result = read_request(spec.LlmSpec(api, max_tokens=100), raw)
    if isinstance(result, Refusal):
        assert result.reason in (spec.BODY_UNREADABLE, spec.MAX_TOKENS_EXCEEDED)
        return
    out = sent(result)
    assert out["model"] == fields["model"] == result.model
    assert set(out) <= set(fields) | WRITABLE
    assert {k: v for k, v in out.items() if k not in WRITABLE} == {
        k: v for k, v in fields.items() if k not in WRITABLE
    }
    names = ["max_tokens"] if api == "anthropic" else ["max_tokens", "max_completion_tokens"]
    ceilings = [out[n] for n in names if out.get(n) is not None]
    assert ceilings and max(ceilings) <= 100 and result.max_output_tokens >= max(ceilings)


def _strict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate")
    return dict(pairs)


JSONISH = st.lists(
    st.sampled_from(
        ["{", "}", "[", "]", ",", ":", " ", '"model"', '"gpt"', "1", "null", '"a"', "e5", "-"]
    ),
    max_size=25,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(text=JSONISH)
def test_the_reader_reads_exactly_what_strict_json_reads(text: str) -> None:
    """A body the pacer reads one way must not reach a provider that reads it another way."""
    try:
        expected: Any = json.loads(text, object_pairs_hook=_strict)
    except ValueError:
        expected = None
    result = read_request(spec.LlmSpec("openai"), text.encode())
    unreadable = isinstance(result, Refusal) and result.message.startswith(
        "the request body is not a single JSON object"
    )
    assert unreadable == (not isinstance(expected, dict))
    if isinstance(result, LlmRequest):
        assert isinstance(expected, dict) and expected["model"] == result.model


@pytest.mark.parametrize(
    ("api", "path", "expected"),
    [
        ("openai", "/v1/chat/completions", CHAT),
        ("openai", "/v1/chat/completions/?x=1", CHAT),
        ("openai", "/v1/responses", RESPONSES),
        ("openai", "/v1/embeddings", EMBEDDINGS),
        ("openai", "/v1/completions", None),  # legacy completions: not metered
        ("openai", "/v1/files", None),
        ("openai", "/v1/batches", None),
        ("openai", "/v1/responses/resp_1/cancel", None),
        ("openai", "/v1/messages", None),
        ("anthropic", "/v1/messages", MESSAGES_CALL),
        ("anthropic", "/v1/messages/count_tokens", COUNT_TOKENS),
        ("anthropic", "/v1/messages/batches", None),
        ("anthropic", "/v1/chat/completions", None),
    ],
)
def test_endpoints(api: spec.LlmApi, path: str, expected: Endpoint | None) -> None:
    assert endpoint_for(api, path) is expected


def test_an_unmetered_path_is_refused_by_read_request() -> None:
    assert admitted(OPENAI, body()).endpoint is CHAT  # no path: the generation call
    result = read_request(OPENAI, body(), "/v1/batches")
    assert isinstance(result, Refusal) and result.reason == spec.BODY_UNREADABLE
    assert "/v1/batches" in result.message


def test_openai_responses_ceiling_is_max_output_tokens() -> None:
    raw = json.dumps({"model": "gpt-4.1", "input": "Say hello.", "stream": True}).encode()
    request = read_request(OPENAI, raw, "/v1/responses")
    assert isinstance(request, LlmRequest) and request.endpoint is RESPONSES
    out = sent(request)
    assert out["max_output_tokens"] == 1024 == request.max_output_tokens
    assert "stream_options" not in out and "max_completion_tokens" not in out  # usage is sent
    over = json.dumps({"model": "gpt-4.1", "input": "x", "max_output_tokens": 5000}).encode()
    refusal = read_request(OPENAI, over, "/v1/responses")
    assert isinstance(refusal, Refusal) and refusal.reason == spec.MAX_TOKENS_EXCEEDED
    assert "max_output_tokens 5000" in refusal.message


def test_openai_embeddings_have_no_output_and_no_injection() -> None:
    raw = json.dumps({"model": "gpt-4.1", "input": ["a", "b"], "n": 4}).encode()
    request = read_request(OPENAI, raw, "/v1/embeddings")
    assert isinstance(request, LlmRequest) and request.body is raw
    assert (request.max_input_tokens, request.max_output_tokens) == (len(raw), 0)


def test_anthropic_token_counting_reserves_nothing_but_the_request() -> None:
    raw = json.dumps({"model": "claude-x", "messages": MESSAGES}).encode()
    request = read_request(ANTHROPIC, raw, "/v1/messages/count_tokens")
    assert isinstance(request, LlmRequest) and request.body is raw
    assert request.most() == {
        "requests": 1,
        "input_tokens": 0,
        "output_tokens": 0,
        "tokens": 0,
        "cost_micro_usd": 0,
    }
    assert read_request(ANTHROPIC, body(model="gpt-4o"), "/v1/messages/count_tokens") == Refusal(
        spec.MODEL_NOT_ALLOWED, "model 'gpt-4o' is not allowed here (allowed: claude-*)"
    )


def test_bodies_with_more_top_level_members_than_any_api_are_refused() -> None:
    fields = {f"extra_{i}": i for i in range(MAX_MEMBERS - 1)}
    assert admitted(OPENAI, body(**{k: v for k, v in list(fields.items())[:-1]})).model
    refusal = refused(OPENAI, body(**fields))
    assert refusal.reason == spec.BODY_UNREADABLE and str(MAX_MEMBERS) in refusal.message


def test_media_inside_a_string_is_not_counted() -> None:
    text = json.dumps({"type": "image_url", "image_url": {"url": "https://x"}})
    raw = body(messages=[{"role": "user", "content": text}], max_tokens=5)
    assert admitted(OPENAI, raw).max_input_tokens == len(raw)
    escaped = b'{"model":"gpt-4o-mini","max_tokens":5,"m":[{"\\u0074ype":"\\u0069mage_url"}]}'
    assert admitted(OPENAI, escaped).max_input_tokens == len(escaped) + MEDIA_ALLOWANCE_TOKENS


COST = spec.BudgetSpec("agent/a/daily", "cost_micro_usd", 25_000_000, "day")
TOKENS = spec.BudgetSpec("agent/a/tokens", "tokens", 10_000, "day")


def test_cost_refusal_fails_closed_only_for_an_unpriced_billed_call_under_a_cost_budget() -> None:
    unpriced = admitted(OPENAI, body(model="gpt-4.1"))
    refusal = unpriced.cost_refusal([TOKENS, COST])
    assert refusal is not None and refusal.reason == spec.MODEL_NOT_ALLOWED
    assert "'gpt-4.1'" in refusal.message
    assert unpriced.cost_refusal([TOKENS]) is None
    assert admitted(OPENAI, body()).cost_refusal([COST]) is None  # gpt-4o-mini is priced
    free = read_request(spec.LlmSpec("anthropic"), body(model="x"), "/v1/messages/count_tokens")
    assert isinstance(free, LlmRequest) and free.cost_refusal([COST]) is None
    assert free.most()["cost_micro_usd"] == 0 == free.spent(50, 0)["cost_micro_usd"]


def test_settlement_is_priced_like_the_reservation() -> None:
    request = admitted(OPENAI, body())
    assert request.spent(1000, 100) == {
        "requests": 1,
        "input_tokens": 1000,
        "output_tokens": 100,
        "tokens": 1100,
        "cost_micro_usd": 150 + 60,
    }
    assert request.spent(10**6, 0)["cost_micro_usd"] == 150_000  # above the reservation: kept

from __future__ import annotations

import copy
import gzip
import itertools
import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llm_payloads import (
    ANTHROPIC_EVENTS,
    ANTHROPIC_MESSAGE,
    OPENAI_CHUNKS,
    OPENAI_COMPLETION,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSE,
    RESPONSES_EVENTS,
    anthropic_sse,
    openai_sse,
    responses_sse,
)

from meshgate.pacing import llm_usage
from meshgate.pacing.llm_usage import Usage, UsageReader, UsageReport
from meshgate.pacing.spec import LlmApi


def read(
    api: LlmApi, content_type: str, body: bytes, cuts: list[int] | None = None, encoding: str = ""
) -> UsageReport:
    reader = UsageReader(api, content_type, encoding)
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts or [])})
    for start, end in itertools.pairwise(points):
        reader.feed(body[start:end])
    return reader.finish()


def test_openai_json() -> None:
    body = json.dumps(OPENAI_COMPLETION, indent=2).encode()
    report = read("openai", "application/json", body)
    assert report == UsageReport(Usage(1117, 46), "gpt-4o-2024-08-06")


def test_openai_stream_takes_the_usage_chunk() -> None:
    report = read("openai", "text/event-stream; charset=utf-8", openai_sse())
    assert report == UsageReport(Usage(9, 12), "gpt-4o-mini-2024-07-18")


def test_openai_stream_without_include_usage_has_no_usage() -> None:
    report = read("openai", "text/event-stream", openai_sse(OPENAI_CHUNKS[:-1]))
    assert report == UsageReport(None, "gpt-4o-mini-2024-07-18")


def test_anthropic_json_counts_cache_reads_and_writes_as_input() -> None:
    report = read("anthropic", "application/json", json.dumps(ANTHROPIC_MESSAGE).encode())
    assert report == UsageReport(Usage(2095 + 2051 + 1000, 503), "claude-sonnet-4-20250514")


def test_anthropic_stream_takes_input_from_start_and_last_output_delta() -> None:
    second_delta = copy.deepcopy(ANTHROPIC_EVENTS[-2])
    second_delta["usage"]["output_tokens"] = 40  # cumulative: the last one wins
    events = [*ANTHROPIC_EVENTS[:-1], second_delta, ANTHROPIC_EVENTS[-1]]
    report = read("anthropic", "text/event-stream", anthropic_sse(events))
    assert report == UsageReport(Usage(125, 40), "claude-opus-4-1-20250805")


def test_anthropic_delta_restating_input_replaces_it() -> None:
    delta = copy.deepcopy(ANTHROPIC_EVENTS[-2])
    delta["usage"].update(input_tokens=30, cache_read_input_tokens=None, output_tokens=15)
    events = [*ANTHROPIC_EVENTS[:-2], delta, ANTHROPIC_EVENTS[-1]]
    report = read("anthropic", "text/event-stream", anthropic_sse(events))
    assert report.usage == Usage(30 + 100, 15)  # a null count keeps the earlier figure


def test_anthropic_stream_cut_before_the_final_delta_has_no_usage() -> None:
    report = read("anthropic", "text/event-stream", anthropic_sse(ANTHROPIC_EVENTS[:5]))
    assert report == UsageReport(None, "claude-opus-4-1-20250805")


def test_a_stream_read_as_the_wrong_api_has_no_usage() -> None:
    assert read("anthropic", "text/event-stream", openai_sse()).usage is None
    assert read("openai", "text/event-stream", anthropic_sse()).usage is None


@pytest.mark.parametrize(
    "content_type", ["text/plain", "", "application/octet-stream", "text/html; charset=utf-8"]
)
def test_other_content_types_are_not_read(content_type: str) -> None:
    body = json.dumps(OPENAI_COMPLETION).encode()
    assert read("openai", content_type, body) == UsageReport(None, None)


def test_json_media_types() -> None:
    body = json.dumps(OPENAI_COMPLETION).encode()
    assert read("openai", "Application/JSON; charset=utf-8", body).usage == Usage(1117, 46)
    assert read("openai", "application/vnd.api+json", body).usage == Usage(1117, 46)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1, "completion_tokens": 3},
        {"prompt_tokens": True, "completion_tokens": 3},
        {"prompt_tokens": 1.5, "completion_tokens": 3},
        {"prompt_tokens": "9", "completion_tokens": 3},
        {"completion_tokens": 3},
    ],
)
def test_bad_counts_are_no_usage(usage: dict[str, object]) -> None:
    body = json.dumps({**OPENAI_COMPLETION, "usage": usage}).encode()
    assert read("openai", "application/json", body).usage is None


def test_json_above_the_limit_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    body = json.dumps(OPENAI_COMPLETION).encode()
    monkeypatch.setattr(llm_usage, "MAX_JSON_BYTES", len(body) - 1)
    assert read("openai", "application/json", body, cuts=[10, 100]).usage is None
    monkeypatch.setattr(llm_usage, "MAX_JSON_BYTES", len(body))
    assert read("openai", "application/json", body, cuts=[10, 100]).usage == Usage(1117, 46)


def test_an_overlong_event_is_dropped_and_the_stream_still_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(llm_usage, "MAX_EVENT_BYTES", 1000)
    huge = copy.deepcopy(OPENAI_CHUNKS[1])
    huge["choices"][0]["delta"]["content"] = "x" * 5000
    huge["usage"] = {"prompt_tokens": 1, "completion_tokens": 1}  # would win if read
    body = openai_sse([*OPENAI_CHUNKS, huge])
    for cuts in ([], [7], list(range(0, len(body), 300))):
        assert read("openai", "text/event-stream", body, cuts).usage == Usage(9, 12)


def test_multi_line_data_events_are_joined() -> None:
    chunk = json.dumps(OPENAI_CHUNKS[-1], indent=1)  # one event, many data: lines
    body = ("".join(f"data:{line}\n" for line in chunk.splitlines()) + "\n").encode()
    assert read("openai", "text/event-stream", body).usage == Usage(9, 12)


def test_a_last_event_without_its_blank_line_is_read() -> None:
    body = openai_sse()[: -len("data: [DONE]\n\n")].rstrip(b"\n")
    assert read("openai", "text/event-stream", body).usage == Usage(9, 12)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies(encoding: str) -> None:
    raw = openai_sse()
    body = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    report = read("openai", "text/event-stream", body, [5, 50, 51], encoding=encoding)
    assert report.usage == Usage(9, 12)


def test_unknown_or_broken_encodings_give_no_usage() -> None:
    raw = json.dumps(OPENAI_COMPLETION).encode()
    assert read("openai", "application/json", raw, encoding="br").usage is None
    assert read("openai", "application/json", raw, encoding="gzip").usage is None


def test_decompression_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm_usage, "MAX_DECODED_BYTES", 1 << 20)
    bomb = gzip.compress(b": keep-alive\n" * (1 << 18) + openai_sse())  # ~3.4 MB of SSE
    assert len(bomb) < 100_000
    assert read("openai", "text/event-stream", bomb, encoding="gzip").usage is None
    monkeypatch.setattr(llm_usage, "MAX_DECODED_BYTES", 4 << 20)
    assert read("openai", "text/event-stream", bomb, encoding="gzip").usage == Usage(9, 12)


SPLITS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=30)
EOLS = st.sampled_from(["\n", "\r\n", "\r"])


@settings(max_examples=300, deadline=None)
@given(cuts=SPLITS, eol=EOLS)
def test_openai_stream_usage_is_the_same_for_every_chunking(cuts: list[int], eol: str) -> None:
    report = read("openai", "text/event-stream", openai_sse(eol=eol), cuts)
    assert report == UsageReport(Usage(9, 12), "gpt-4o-mini-2024-07-18")


@settings(max_examples=300, deadline=None)
@given(cuts=SPLITS, eol=EOLS)
def test_anthropic_stream_usage_is_the_same_for_every_chunking(cuts: list[int], eol: str) -> None:
    report = read("anthropic", "text/event-stream", anthropic_sse(eol=eol), cuts)
    assert report == UsageReport(Usage(125, 15), "claude-opus-4-1-20250805")


@settings(max_examples=100, deadline=None)
@given(cuts=SPLITS)
def test_json_usage_is_the_same_for_every_chunking(cuts: list[int]) -> None:
    body = json.dumps(ANTHROPIC_MESSAGE).encode()
    assert read("anthropic", "application/json", body, cuts).usage == Usage(5146, 503)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000), cuts=SPLITS)
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    for api in ("openai", "anthropic"):
        for content_type in ("text/event-stream", "application/json"):
            report = read(api, content_type, data, cuts)
            assert report.usage is None or report.usage.input_tokens >= 0


def test_openai_responses_json_and_stream() -> None:
    body = json.dumps(OPENAI_RESPONSE).encode()
    expected = UsageReport(Usage(36, 87), "gpt-4.1-2025-04-14")
    assert read("openai", "application/json", body) == expected
    assert read("openai", "text/event-stream", responses_sse(), [3, 700, 701]) == expected
    cut = responses_sse(RESPONSES_EVENTS[:-1])  # ends before response.completed
    assert read("openai", "text/event-stream", cut) == UsageReport(None, "gpt-4.1-2025-04-14")


def test_a_failed_or_incomplete_response_still_states_its_usage() -> None:
    failed = {**OPENAI_RESPONSE, "status": "incomplete"}
    event = {"type": "response.incomplete", "sequence_number": 3, "response": failed}
    body = responses_sse([*RESPONSES_EVENTS[:-1], event])
    assert read("openai", "text/event-stream", body).usage == Usage(36, 87)


def test_openai_embeddings_have_no_output() -> None:
    body = json.dumps(OPENAI_EMBEDDINGS).encode()
    report = read("openai", "application/json", body)
    assert report == UsageReport(Usage(8, 0), "text-embedding-3-small")
    odd = {**OPENAI_EMBEDDINGS, "usage": {"prompt_tokens": 8, "total_tokens": 20}}
    assert read("openai", "application/json", json.dumps(odd).encode()).usage is None


@pytest.mark.parametrize(
    "sep", [b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x85", "\u2028".encode()]
)
def test_only_cr_and_lf_end_lines(sep: bytes) -> None:
    """Other line separators (str.splitlines splits at these) must not make a comment a
    data line."""
    fake = b'data: {"model":"x","usage":{"prompt_tokens":1,"completion_tokens":1}}'
    body = b":" + sep + fake + b"\n\n" + openai_sse()
    for cuts in ([], [1], [2, 3]):
        assert read("openai", "text/event-stream", body, cuts).usage == Usage(9, 12)
    fake_last = openai_sse() + b":" + sep + fake + b"\n\n"
    assert read("openai", "text/event-stream", fake_last).usage == Usage(9, 12)

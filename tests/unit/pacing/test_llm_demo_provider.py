"""The readers against the project's own stand-in provider (meshgate.demo.llm_provider, what
the end-to-end tests and benchmarks use), over a real loopback socket: what the pacer would
forward gets the usage it needs back, within what it reserved."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from meshgate.demo.llm_provider import LlmProvider
from meshgate.pacing import spec
from meshgate.pacing.llm_request import LlmRequest, read_request
from meshgate.pacing.llm_usage import Usage, UsageReader, UsageReport


@pytest.fixture
async def provider() -> AsyncIterator[tuple[LlmProvider, str]]:
    mock = LlmProvider(reply_tokens=40)
    port = await mock.start()
    try:
        yield mock, f"http://127.0.0.1:{port}"
    finally:
        await mock.stop()


async def call(url: str, api: spec.LlmApi, forwarded: bytes) -> UsageReport:
    path = "/v1/chat/completions" if api == "openai" else "/v1/messages"
    async with (
        httpx.AsyncClient() as client,
        client.stream(
            "POST", url + path, content=forwarded, headers={"content-type": "application/json"}
        ) as response,
    ):
        assert response.status_code == 200
        reader = UsageReader(
            api,
            response.headers.get("content-type", ""),
            response.headers.get("content-encoding", ""),
        )
        async for chunk in response.aiter_raw():
            reader.feed(chunk)
        return reader.finish()


MESSAGES = [{"role": "user", "content": "Count to forty."}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_usage_comes_back_within_the_reservation(
    provider: tuple[LlmProvider, str], api: spec.LlmApi, stream: bool
) -> None:
    mock, url = provider
    raw = json.dumps({"model": "m-1", "messages": MESSAGES, "stream": stream}).encode()
    request = read_request(spec.LlmSpec(api, max_tokens=25), raw)
    assert isinstance(request, LlmRequest)
    report = await call(url, api, request.body)
    assert report.model == "m-1"
    assert report.usage is not None
    assert report.usage.output_tokens == 25  # held to the injected ceiling (it would say 40)
    assert report.usage.input_tokens <= request.max_input_tokens
    assert report.usage.output_tokens <= request.max_output_tokens
    assert mock.seen[-1].body == json.loads(request.body)


async def test_an_openai_stream_without_our_rewrite_states_no_usage(
    provider: tuple[LlmProvider, str],
) -> None:
    _, url = provider
    raw = json.dumps({"model": "m-1", "messages": MESSAGES, "stream": True}).encode()
    report = await call(url, "openai", raw)
    assert report == UsageReport(None, "m-1")
    request = read_request(spec.LlmSpec("openai"), raw)
    assert isinstance(request, LlmRequest)
    assert (await call(url, "openai", request.body)).usage == Usage(
        report_prompt_tokens(MESSAGES), 40
    )


def report_prompt_tokens(messages: object) -> int:
    """The stand-in's own count: the messages' JSON length / 4, rounded up."""
    return max(1, -(-len(json.dumps(messages)) // 4))

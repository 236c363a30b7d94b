"""The LLM readers against the official `openai` and `anthropic` SDKs: the payloads the tests
use parse in the SDKs' own models, the request bodies the SDKs send are read and rewritten into
bodies the SDKs' request types accept, and the usage we read from a response is the usage the
SDK reports to its caller for the same bytes."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import openai
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types import message_create_params as anthropic_params
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
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat import completion_create_params as openai_params
from openai.types.responses import Response, ResponseStreamEvent, response_create_params

from meshgate.pacing import spec
from meshgate.pacing.llm_request import LlmRequest, read_request
from meshgate.pacing.llm_usage import Usage, UsageReader

OPENAI = spec.LlmSpec("openai", ("gpt-4o-mini*",), 512)
ANTHROPIC = spec.LlmSpec("anthropic", ("claude-*",), 512)
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]


def test_the_payloads_are_what_the_sdks_parse() -> None:
    completion = ChatCompletion.model_validate(OPENAI_COMPLETION)
    assert completion.usage is not None and completion.usage.prompt_tokens == 1117
    chunks = [ChatCompletionChunk.model_validate(c) for c in OPENAI_CHUNKS]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    message = Message.model_validate(ANTHROPIC_MESSAGE)
    assert message.usage.cache_read_input_tokens == 1000
    assert Response.model_validate(OPENAI_RESPONSE).usage is not None
    for event in RESPONSES_EVENTS:
        parsed = pydantic.TypeAdapter(ResponseStreamEvent).validate_python(event)
        assert parsed.type == event["type"]
    assert CreateEmbeddingResponse.model_validate(OPENAI_EMBEDDINGS).usage.prompt_tokens == 8
    events = pydantic.TypeAdapter(RawMessageStreamEvent)
    for event in ANTHROPIC_EVENTS:
        if event["type"] != "ping":  # keep-alives: the SDK skips them before its models
            assert events.validate_python(event).type == event["type"]


class Provider:
    """A local mock provider (loopback HTTP): reads each request as the pacer would, then
    answers with `body`. A real socket rather than a mock transport: the SDKs' HTTP client
    libraries change between major versions, their wire format does not."""

    def __init__(self, llm: spec.LlmSpec, body: bytes, media: str) -> None:
        self.paths: list[str] = []
        self.seen: list[LlmRequest] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["content-length"]))
                outer.paths.append(self.path)
                result = read_request(llm, raw, self.path)
                if isinstance(result, LlmRequest):
                    outer.seen.append(result)
                    self.send_response(200)
                    self.send_header("content-type", media)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(400, result.message)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Provider:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def usage_of(api: spec.LlmApi, media: str, body: bytes) -> Usage | None:
    reader = UsageReader(api, media)
    for i in range(0, len(body), 37):  # an odd chunk size: splits inside lines and UTF-8
        reader.feed(body[i : i + 37])
    return reader.finish().usage


def test_openai_sdk_stream() -> None:
    body, media = openai_sse(), "text/event-stream"
    with Provider(OPENAI, body, media) as mock:
        client = openai.OpenAI(api_key="k", base_url=mock.url + "/v1", max_retries=0)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        chunks = list(stream)
    request = mock.seen[0]
    params = pydantic.TypeAdapter(openai_params.CompletionCreateParamsStreaming).validate_python(
        json.loads(request.body)
    )
    assert params["stream_options"] == {"include_usage": True}
    assert params["max_completion_tokens"] == 512 == request.max_output_tokens
    sdk_usage = chunks[-1].usage
    assert sdk_usage is not None
    assert usage_of("openai", media, body) == Usage(
        sdk_usage.prompt_tokens, sdk_usage.completion_tokens
    )


def test_openai_sdk_json() -> None:
    body, media = json.dumps(OPENAI_COMPLETION).encode(), "application/json"
    with Provider(OPENAI, body, media) as mock:
        client = openai.OpenAI(api_key="k", base_url=mock.url + "/v1", max_retries=0)
        completion = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=100, n=2
        )
    request = mock.seen[0]
    assert not request.rewritten and request.max_output_tokens == 200
    pydantic.TypeAdapter(openai_params.CompletionCreateParamsNonStreaming).validate_python(
        json.loads(request.body)
    )
    assert completion.usage is not None
    expected = Usage(completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert usage_of("openai", media, body) == expected


def test_anthropic_sdk_stream_with_the_ceiling_injected() -> None:
    """The SDK requires max_tokens; an agent calling the HTTP API directly may leave it out."""
    raw = json.dumps({"model": "claude-sonnet-4-5", "messages": MESSAGES, "stream": True}).encode()
    request = read_request(ANTHROPIC, raw)
    assert isinstance(request, LlmRequest)
    params = pydantic.TypeAdapter(anthropic_params.MessageCreateParamsStreaming)
    with pytest.raises(pydantic.ValidationError):
        params.validate_python(json.loads(raw))
    assert params.validate_python(json.loads(request.body))["max_tokens"] == 512

    body, media = anthropic_sse(), "text/event-stream"
    with Provider(ANTHROPIC, body, media) as mock:
        client = anthropic.Anthropic(api_key="k", base_url=mock.url, max_retries=0)
        with client.messages.stream(
            model="claude-sonnet-4-5", max_tokens=300, messages=MESSAGES
        ) as stream:
            final = stream.get_final_message()
    seen = mock.seen[0]
    assert seen.stream and not seen.rewritten and seen.max_output_tokens == 300
    u = final.usage
    cached = (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0)
    assert usage_of("anthropic", media, body) == Usage(u.input_tokens + cached, u.output_tokens)
    assert final.model == "claude-opus-4-1-20250805"


def test_anthropic_sdk_json() -> None:
    body, media = json.dumps(ANTHROPIC_MESSAGE).encode(), "application/json"
    with Provider(ANTHROPIC, body, media) as mock:
        client = anthropic.Anthropic(api_key="k", base_url=mock.url, max_retries=0)
        message = client.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES)
    assert mock.seen[0].max_output_tokens == 64 and not mock.seen[0].rewritten
    u = message.usage
    cached = (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0)
    assert usage_of("anthropic", media, body) == Usage(u.input_tokens + cached, u.output_tokens)


def test_openai_sdk_responses_stream() -> None:
    body, media = responses_sse(), "text/event-stream"
    with Provider(OPENAI, body, media) as mock:
        client = openai.OpenAI(api_key="k", base_url=mock.url + "/v1", max_retries=0)
        events = list(client.responses.create(model="gpt-4o-mini", input="Hi", stream=True))
    assert mock.paths == ["/v1/responses"]
    request = mock.seen[0]
    params = pydantic.TypeAdapter(response_create_params.ResponseCreateParamsStreaming)
    assert params.validate_python(json.loads(request.body))["max_output_tokens"] == 512
    final = events[-1]
    assert final.type == "response.completed" and final.response.usage is not None
    u = final.response.usage
    assert usage_of("openai", media, body) == Usage(u.input_tokens, u.output_tokens)


def test_openai_sdk_embeddings() -> None:
    body, media = json.dumps(OPENAI_EMBEDDINGS).encode(), "application/json"
    with Provider(OPENAI, body, media) as mock:
        client = openai.OpenAI(api_key="k", base_url=mock.url + "/v1", max_retries=0)
        result = client.embeddings.create(model="gpt-4o-mini-embed", input=["a", "b"])
    assert mock.paths == ["/v1/embeddings"]
    assert not mock.seen[0].rewritten and mock.seen[0].max_output_tokens == 0
    assert usage_of("openai", media, body) == Usage(result.usage.prompt_tokens, 0)

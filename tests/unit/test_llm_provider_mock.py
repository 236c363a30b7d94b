"""The local LLM stand-in speaks the real APIs: the official SDKs read its answers and usage,
in JSON and streamed, so gateway tests through it exercise what real providers send."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import openai
import pytest

from meshgate.demo.llm_provider import LlmProvider


@pytest.fixture
async def provider() -> AsyncIterator[tuple[LlmProvider, str]]:
    p = LlmProvider(reply_tokens=5)
    port = await p.start()
    yield p, f"http://127.0.0.1:{port}"
    await p.stop()


async def test_openai_sdk_reads_answers_and_usage(provider: tuple[LlmProvider, str]) -> None:
    p, base = provider
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k")
    messages = [{"role": "user", "content": "hello"}]
    done = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    assert done.choices[0].message.content == "ok ok ok ok ok"
    assert done.usage is not None and done.usage.completion_tokens == 5
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == "ok ok ok"
    assert usage is not None and usage.completion_tokens == 3
    assert usage.prompt_tokens == done.usage.prompt_tokens
    assert p.seen[-1].headers["Authorization"] == "Bearer k"
    await client.close()


async def test_anthropic_sdk_reads_answers_and_usage(provider: tuple[LlmProvider, str]) -> None:
    _, base = provider
    client = anthropic.AsyncAnthropic(base_url=base, api_key="k")
    messages = [{"role": "user", "content": "hello"}]
    done = await client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=2,
        messages=messages,  # type: ignore[arg-type]
    )
    assert done.usage.output_tokens == 2 and done.stop_reason == "max_tokens"
    async with client.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=100,
        messages=messages,  # type: ignore[arg-type]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "ok ok ok ok ok"
    assert final.usage.output_tokens == 5 and final.usage.input_tokens == done.usage.input_tokens
    await client.close()

"""The input reservation against a real tokenizer: the body's UTF-8 size is at least the
prompt's token count (OpenAI's counting recipe: the content, the role, 3 tokens of framing per
message and 3 to prime the reply). Neither tokenizer is a project dependency: `tiktoken` loads
its vocabularies from the network, `bpe-openai` ships them; the property runs with whichever
is installed and usable, and is skipped (saying so) with neither."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.pacing import spec
from meshgate.pacing.llm_request import LlmRequest, read_request

Encode = Callable[[str], int]


def _tokenizers() -> dict[str, Encode]:
    names = ("o200k_base", "cl100k_base")
    try:
        import tiktoken

        encodings: list[Any] = [tiktoken.get_encoding(n) for n in names]
    except Exception:  # not installed, or its vocabulary cannot be downloaded here
        try:
            import bpe_openai

            encodings = [bpe_openai.get_encoding(n) for n in names]
        except Exception:
            return {}
    return {
        name: (lambda text, e=enc: len(e.encode(text, disallowed_special=())))
        for name, enc in zip(names, encodings, strict=True)
    }


TOKENIZERS = _tokenizers()
pytestmark = pytest.mark.skipif(
    not TOKENIZERS, reason="no usable tokenizer (tiktoken with its vocabularies, or bpe-openai)"
)

SAMPLES = [
    "Say hello.",
    " " * 4000,
    "\n\n\n\t\t" * 300,
    "日本語のテキストです。" * 100,
    "😀🙈🧑‍🧑‍🧒" * 200,
    "def f(x):\n    return {'a': [x, x ** 2]}\n" * 50,
    "<|endoftext|><|im_start|>system" * 20,
    "a" * 10_000,
    "0123456789" * 500,
    '"\\/\b\f\n\r\t' * 300,
]


def prompt_tokens(messages: list[dict[str, str]], count: Encode) -> int:
    return 3 + sum(3 + sum(count(v) for v in m.values()) for m in messages)


def estimate(messages: list[dict[str, str]], ensure_ascii: bool) -> int:
    raw = json.dumps({"model": "gpt-4o", "messages": messages}, ensure_ascii=ensure_ascii)
    request = read_request(spec.LlmSpec("openai"), raw.encode())
    assert isinstance(request, LlmRequest)
    return request.max_input_tokens


@pytest.mark.parametrize("text", SAMPLES)
def test_the_estimate_bounds_sample_texts(text: str) -> None:
    messages = [{"role": "user", "content": text}]
    for count in TOKENIZERS.values():
        assert estimate(messages, ensure_ascii=False) >= prompt_tokens(messages, count)


MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text()}
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(messages=MESSAGES, ensure_ascii=st.booleans())
def test_the_estimate_bounds_any_text(messages: list[dict[str, str]], ensure_ascii: bool) -> None:
    for count in TOKENIZERS.values():
        assert estimate(messages, ensure_ascii) >= prompt_tokens(messages, count)

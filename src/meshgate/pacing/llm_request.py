"""Read an LLM request body before admission: refuse it, or say what it may cost. Pure: no I/O.

The agent is hostile, so the body is read strictly (one JSON object, no duplicate keys, UTF-8,
nothing after it): a body the pacer reads one way must not reach a provider that reads it
another way. Rewrites (an injected token ceiling, OpenAI's streamed usage) are spliced into the
original text rather than re-serialising it, so every byte the agent sent is forwarded as sent.

The reservation must be an upper bound, or concurrent requests can overshoot a budget:
- output: the token ceiling the provider is held to (ours injected when the agent gave none;
  OpenAI's `n` choices each get it; rejected predicted-output tokens are billed as output, so
  the prediction's size is added);
- input: there is no tokenizer here, but OpenAI's tokenizers are byte-level BPE, where every
  token stands for at least one byte of its text, so the UTF-8 size of the whole body (text
  plus JSON syntax, which outweighs the few tokens of chat framing per message) is at least
  the prompt's token count (tests check it against o200k/cl100k when a tokenizer is
  installed). Anthropic's tokenizer is not published; the same bound is assumed. Media and
  tool definitions are priced by the provider apart from their bytes, so each media part and
  an Anthropic tool list add a fixed allowance (below).
  Not bounded: documents fetched by reference (a PDF URL or file id, priced per page),
  server-side tools (web search results become input) and OpenAI's stored conversation state
  (`previous_response_id`, `conversation`); such calls are settled at the real usage, which
  may pass the reservation.

Metered calls (`endpoint_for`): OpenAI chat completions, responses and embeddings; Anthropic
messages and token counting (free). Anything else on an LLM destination is the pacer's call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from meshgate.pacing import pricing, spec

DEFAULT_MAX_TOKENS = 4096
"""Injected when the agent set no output ceiling and the route has none: without a ceiling a
request's cost has no bound to reserve (OpenAI would allow up to the model's context)."""

MEDIA_ALLOWANCE_TOKENS = 8192
"""Added per image, audio, file or document part. An image costs at most ~1,500 tokens on
gpt-4o, ~3,800 on gpt-4.1-nano's patch scheme, ~6,600 at Claude's largest resolution."""

TOOLS_ALLOWANCE_TOKENS = 1024
"""Added when an Anthropic request lists tools: the tool-use system prompt the API adds
(313 to 530 tokens depending on the model and tool_choice)."""

MAX_MEMBERS = 256
"""Top-level members a body may have: the APIs define a few dozen, and each costs the reader
Python work (a 1 MB body of 100,000 members took 260 ms of CPU)."""

_MEDIA_TYPES = frozenset(
    # OpenAI chat, OpenAI responses, Anthropic messages
    {"image_url", "input_audio", "file", "input_image", "input_file", "image", "document"}
)


@dataclass(frozen=True)
class Refusal:
    reason: str  # spec.MODEL_NOT_ALLOWED | spec.MAX_TOKENS_EXCEEDED | spec.BODY_UNREADABLE
    message: str  # for the agent: names the model or the ceiling


@dataclass(frozen=True)
class LlmRequest:
    """An admitted request: what to forward and the most it can use."""

    model: str
    endpoint: Endpoint
    stream: bool
    body: bytes  # to forward: the agent's bytes, with our insertions when `rewritten`
    rewritten: bool
    max_input_tokens: int
    max_output_tokens: int
    price: spec.Price | None  # None: no usable price matches the model

    def most(self) -> dict[spec.Unit, int]:
        """The reservation, per unit; `cost_micro_usd` absent when unpriced (see
        `cost_refusal`)."""
        if not self.endpoint.billed:
            return {**pricing.amounts(0, 0, None), "cost_micro_usd": 0}
        return pricing.amounts(self.max_input_tokens, self.max_output_tokens, self.price)

    def spent(self, input_tokens: int, output_tokens: int) -> dict[spec.Unit, int]:
        """The settlement for the usage the provider reported, priced like the reservation
        (by the model the agent asked for, which the route's rules were checked against)."""
        if not self.endpoint.billed:
            return self.most()
        return pricing.amounts(input_tokens, output_tokens, self.price)

    def cost_refusal(self, budgets: Iterable[spec.BudgetSpec]) -> Refusal | None:
        """Fail closed: a cost budget cannot hold a call it cannot price."""
        if not self.endpoint.billed or self.price is not None:
            return None
        message = pricing.unpriced_refusal(self.model, budgets)
        return None if message is None else Refusal(spec.MODEL_NOT_ALLOWED, message)


@dataclass(frozen=True)
class Endpoint:
    """An LLM API call the pacer can meter, and how its body bounds what it produces."""

    name: str
    ceilings: tuple[str, ...]  # output ceiling fields; the first is injected; none: no output
    choices: str | None = None  # a field multiplying the output (OpenAI chat's `n`)
    usage_option: bool = False  # streams carry usage only when `stream_options` asks
    billed: bool = True  # Anthropic's token counting is free: nothing to reserve


CHAT = Endpoint("chat", ("max_completion_tokens", "max_tokens"), "n", usage_option=True)
RESPONSES = Endpoint("responses", ("max_output_tokens",))
EMBEDDINGS = Endpoint("embeddings", ())
MESSAGES = Endpoint("messages", ("max_tokens",))
COUNT_TOKENS = Endpoint("count_tokens", (), billed=False)

_ENDPOINTS: dict[spec.LlmApi, tuple[tuple[str, Endpoint], ...]] = {
    # a path before any path it ends with ("/messages/count_tokens" before "/messages")
    "openai": (
        ("/chat/completions", CHAT),
        ("/responses", RESPONSES),
        ("/embeddings", EMBEDDINGS),
    ),
    "anthropic": (("/messages/count_tokens", COUNT_TOKENS), ("/messages", MESSAGES)),
}


def endpoint_for(api: spec.LlmApi, path: str) -> Endpoint | None:
    """The metered call a request path names (query ignored), or None: another API (files,
    batches, models...) that the pacer cannot meter by tokens."""
    route = path.partition("?")[0].rstrip("/")
    for suffix, endpoint in _ENDPOINTS[api]:
        if route.endswith(suffix):
            return endpoint
    return None


def read_request(llm: spec.LlmSpec, body: bytes, path: str | None = None) -> LlmRequest | Refusal:
    """Refuse the request or say what to forward and reserve. `path`: the request's :path
    (None: the API's generation call, chat completions or messages)."""
    if path is None:
        endpoint: Endpoint | None = CHAT if llm.api == "openai" else MESSAGES
    else:
        endpoint = endpoint_for(llm.api, path)
    if endpoint is None:
        return Refusal(spec.BODY_UNREADABLE, f"{path} is not an {llm.api} call meshgate can meter")
    try:
        text = body.decode("utf-8")
        doc = _Document.parse(text)
    except (ValueError, RecursionError) as e:
        return Refusal(spec.BODY_UNREADABLE, f"the request body is not a single JSON object: {e}")
    try:
        return _read(llm, endpoint, body, doc)
    except _Refused as r:
        return r.refusal


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.refusal = Refusal(reason, message)


def _read(llm: spec.LlmSpec, endpoint: Endpoint, body: bytes, doc: _Document) -> LlmRequest:
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise _Refused(spec.BODY_UNREADABLE, "the request body names no model (a string)")
    if llm.models and not any(fnmatchcase(model, glob) for glob in llm.models):
        raise _Refused(
            spec.MODEL_NOT_ALLOWED,
            f"model {model!r} is not allowed here (allowed: {', '.join(llm.models)})",
        )
    stream = doc.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _Refused(spec.BODY_UNREADABLE, "stream must be true or false")

    max_output = 0
    if endpoint.ceilings:
        max_output = _ceiling(llm, endpoint, doc)
        if "prediction" in doc.members and endpoint is CHAT:
            max_output += len(doc.value_text("prediction").encode("utf-8"))
        if endpoint.choices is not None:
            max_output *= _positive_or_none(doc, endpoint.choices) or 1
    if stream and endpoint.usage_option:
        _ask_for_usage(doc)

    max_input = len(body) + MEDIA_ALLOWANCE_TOKENS * doc.media
    if llm.api == "anthropic" and doc.get("tools"):
        max_input += TOOLS_ALLOWANCE_TOKENS
    if not endpoint.billed:
        max_input = max_output = 0

    out = doc.render()
    return LlmRequest(
        model=model,
        endpoint=endpoint,
        stream=stream,
        body=body if out is None else out.encode("utf-8"),
        rewritten=out is not None,
        max_input_tokens=max_input,
        max_output_tokens=max_output,
        price=pricing.price_for(llm.prices, model),
    )


def _ceiling(llm: spec.LlmSpec, endpoint: Endpoint, doc: _Document) -> int:
    """The most tokens the provider may produce per choice: the agent's ceiling (the larger
    when it gives both of OpenAI's), checked against the route's, or one injected."""
    given = {name: _positive_or_none(doc, name) for name in endpoint.ceilings}
    present = {name: value for name, value in given.items() if value is not None}
    if not present:
        ceiling = llm.max_tokens if llm.max_tokens is not None else DEFAULT_MAX_TOKENS
        doc.set(endpoint.ceilings[0], ceiling)
        return ceiling
    name, ceiling = max(present.items(), key=lambda item: item[1])
    if llm.max_tokens is not None and ceiling > llm.max_tokens:
        raise _Refused(
            spec.MAX_TOKENS_EXCEEDED,
            f"{name} {ceiling} is above this route's ceiling of {llm.max_tokens} tokens",
        )
    return ceiling


def _ask_for_usage(doc: _Document) -> None:
    """OpenAI streams carry usage only when asked (a last chunk with empty choices)."""
    options = doc.get("stream_options")
    if options is None:
        doc.set("stream_options", {"include_usage": True})
    elif not isinstance(options, dict):
        raise _Refused(spec.BODY_UNREADABLE, "stream_options must be an object")
    elif options.get("include_usage") is not True:
        doc.set("stream_options", {**options, "include_usage": True})


def _positive_or_none(doc: _Document, name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Refused(spec.BODY_UNREADABLE, f"{name} must be a positive integer")
    return value


def _first_duplicate(pairs: list[tuple[str, Any]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return ""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_WS = re.compile(r"[ \t\n\r]*")


def _skip(text: str, i: int) -> int:
    """Past the JSON whitespace at `i`."""
    match = _WS.match(text, i)
    assert match is not None  # the pattern matches the empty string
    return match.end()


@dataclass
class _Member:
    value: Any
    value_start: int  # in the text, characters
    value_end: int


@dataclass
class _Document:
    """A top-level JSON object that remembers where each member's value is in its text, so
    members can be set by splicing."""

    text: str
    close: int  # index of the final "}"
    members: dict[str, _Member]
    media: int  # objects below the top level whose "type" is a media part's
    edits: dict[str, str] = field(default_factory=dict)  # key -> new value's JSON text

    @classmethod
    def parse(cls, text: str) -> _Document:
        media = 0

        def strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            """Each nested object, once, as the C scanner builds it: a duplicate key is
            refused (which one would the provider use?) and media parts are counted."""
            nonlocal media
            out = dict(pairs)
            if len(out) != len(pairs):
                raise ValueError(f"duplicate key {_first_duplicate(pairs)!r}")
            kind = out.get("type")
            if isinstance(kind, str) and kind in _MEDIA_TYPES:  # the agent's may be a list
                media += 1
            return out

        decoder = json.JSONDecoder(object_pairs_hook=strict_object, parse_constant=_no_constant)
        members: dict[str, _Member] = {}
        i = _skip(text, 0)
        if text[i : i + 1] != "{":
            raise ValueError("the top level is not an object")
        i = _skip(text, i + 1)
        while text[i : i + 1] != "}" or members:
            if text[i : i + 1] != '"':
                raise ValueError(f"expected a member name at character {i}")
            key, i = decoder.raw_decode(text, i)
            if key in members:
                raise ValueError(f"duplicate key {key!r}")
            if len(members) == MAX_MEMBERS:
                raise ValueError(f"more than {MAX_MEMBERS} top-level members")
            i = _skip(text, i)
            if text[i : i + 1] != ":":
                raise ValueError(f"expected ':' at character {i}")
            start = _skip(text, i + 1)
            value, end = decoder.raw_decode(text, start)
            members[key] = _Member(value, start, end)
            i = _skip(text, end)
            if text[i : i + 1] == ",":
                i = _skip(text, i + 1)
                continue
            if text[i : i + 1] != "}":
                raise ValueError(f"expected ',' or '}}' at character {i}")
            break
        close = i
        if _skip(text, close + 1) != len(text):
            raise ValueError("data after the object")
        return cls(text, close, members, media)

    def get(self, key: str) -> Any:
        member = self.members.get(key)
        return None if member is None else member.value

    def values(self) -> Iterator[Any]:
        return (m.value for m in self.members.values())

    def value_text(self, key: str) -> str:
        member = self.members[key]
        return self.text[member.value_start : member.value_end]

    def set(self, key: str, value: Any) -> None:
        try:
            self.edits[key] = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except ValueError as e:
            raise _Refused(spec.BODY_UNREADABLE, f"{key}: {e}") from None

    def render(self) -> str | None:
        """The text with the edits spliced in; None when there are none."""
        if not self.edits:
            return None
        spans = sorted(
            (
                (m.value_start, m.value_end, self.edits[k])
                for k, m in self.members.items()
                if k in self.edits
            ),
            reverse=True,
        )
        added = "".join(
            f",{json.dumps(k)}:{v}" if self.members or i else f"{json.dumps(k)}:{v}"
            for i, (k, v) in enumerate(
                (k, v) for k, v in self.edits.items() if k not in self.members
            )
        )
        text = self.text[: self.close] + added + self.text[self.close :]
        for start, end, new in spans:
            text = text[:start] + new + text[end:]
        return text

"""Find what an LLM call really used in its response body, fed as it streams. Pure: no I/O.

The pacer settles a reservation with this usage; when none is found (`usage` None) it charges
the reservation in full, so the reader only reports usage the provider stated for the whole
call: OpenAI's usage object (chat streams: the last chunk, which `stream_options.include_usage`
asks for; responses streams: the final `response.completed`, `.incomplete` or `.failed`
event) and Anthropic's final `message_delta` (its output count is cumulative; a stream cut
before it has no final count). Memory is bounded whatever the provider or a middlebox sends:
JSON is buffered up to `MAX_JSON_BYTES`, server-sent events are read line by line with lines
and events up to `MAX_EVENT_BYTES`, and a compressed body decodes at most `MAX_DECODED_BYTES`.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any, Literal

from meshgate.pacing import spec

MAX_JSON_BYTES = 8 * 1024 * 1024
MAX_EVENT_BYTES = 1024 * 1024
MAX_DECODED_BYTES = 256 * 1024 * 1024
_DECODE_STEP = 64 * 1024  # decompressed bytes produced per step, so a bomb never sits in memory

_USAGE = re.compile(rb'"usage"\s*:\s*\{')  # an event stating usage (most state none)
_ANTHROPIC_INPUT = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


@dataclass(frozen=True)
class Usage:
    input_tokens: int  # Anthropic: uncached + cache writes + cache reads
    output_tokens: int


@dataclass(frozen=True)
class UsageReport:
    usage: Usage | None  # None: not stated; the pacer charges the reservation in full
    model: str | None  # the model the provider says answered (audit), when stated


class UsageReader:
    """Feed every chunk of one response body in order, then `finish`."""

    def __init__(self, api: spec.LlmApi, content_type: str, content_encoding: str = "") -> None:
        self._api = api
        self._kind = _kind(content_type)
        encoding = content_encoding.strip().lower()
        self._inflate: Any = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib header
        elif encoding not in ("", "identity"):
            self._kind = None  # br, zstd...: not read; charged in full
        self._decoded = 0
        self._json = bytearray()
        self._line = bytearray()
        self._line_too_long = False
        self._after_cr = False
        self._data: list[bytes] = []
        self._data_size = 0
        self._model: str | None = None
        self._usage: Usage | None = None
        self._anthropic_input: dict[str, int] = {}

    def feed(self, chunk: bytes) -> None:
        if self._kind is None or not chunk:
            return
        if self._inflate is None:
            self._take(chunk)
            return
        try:
            out = self._inflate.decompress(chunk, _DECODE_STEP)
            while True:
                self._decoded += len(out)
                if self._decoded > MAX_DECODED_BYTES:
                    self._give_up()
                    return
                self._take(out)
                if self._kind is None or not self._inflate.unconsumed_tail:
                    return
                out = self._inflate.decompress(self._inflate.unconsumed_tail, _DECODE_STEP)
        except zlib.error:
            self._give_up()

    def finish(self) -> UsageReport:
        if self._kind == "json":
            self._finish_json()
        elif self._kind == "sse":
            self._end_line(bytes(self._line))
            self._dispatch()
        self._kind = None
        return UsageReport(self._usage, self._model)

    def _give_up(self) -> None:
        self._kind = None
        self._json = bytearray()
        self._line = bytearray()
        self._data = []
        self._usage = None

    def _take(self, data: bytes) -> None:
        if self._kind == "json":
            if len(self._json) + len(data) > MAX_JSON_BYTES:
                self._give_up()
            else:
                self._json += data
        elif self._kind == "sse":
            self._take_sse(data)

    def _take_sse(self, data: bytes) -> None:
        start = 0
        if self._after_cr and data[:1] == b"\n":
            start = 1  # the "\n" of a "\r\n" split between chunks
        end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1  # past the last line end
        self._after_cr = end == len(data) and data.endswith(b"\r")
        if end <= start:
            self._append_line(data[start:])
            return
        # bytes.splitlines ends lines at "\r\n", "\r" and "\n": exactly SSE's line ends
        lines = data[start:end].splitlines()
        if self._line or self._line_too_long:
            self._append_line(lines[0])
            lines[0] = bytes(self._line)
        for line in lines:
            self._end_line(line)
        self._append_line(data[end:])

    def _append_line(self, part: bytes) -> None:
        if self._line_too_long:
            return
        if len(self._line) + len(part) > MAX_EVENT_BYTES:
            self._line_too_long = True
            self._line = bytearray()
        else:
            self._line += part

    def _end_line(self, line: bytes) -> None:
        """One SSE line (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""
        too_long = self._line_too_long or len(line) > MAX_EVENT_BYTES
        self._line_too_long, self._line = False, bytearray()
        if too_long:
            self._data, self._data_size = [], MAX_EVENT_BYTES + 1  # drop the whole event
            return
        if not line:
            self._dispatch()
            return
        name, colon, value = line.partition(b":")
        if name != b"data" or not colon:
            return  # event:, id:, retry:, comments; a bare "data" line adds nothing here
        if value.startswith(b" "):
            value = value[1:]
        self._data_size += len(value) + 1
        if self._data_size <= MAX_EVENT_BYTES:
            self._data.append(value)

    def _dispatch(self) -> None:
        data, size = self._data, self._data_size
        self._data, self._data_size = [], 0
        if not data or size > MAX_EVENT_BYTES:
            return
        payload = b"\n".join(data)
        if payload == b"[DONE]" or (self._model is not None and not _USAGE.search(payload)):
            return  # content deltas: most of a stream, not worth decoding once the model is known
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        if self._api == "openai":
            self._openai(event)
        else:
            self._anthropic_event(event)

    def _finish_json(self) -> None:
        try:
            body = json.loads(bytes(self._json))
        except (ValueError, RecursionError):
            return
        finally:
            self._json = bytearray()
        if not isinstance(body, dict):
            return
        if self._api == "openai":
            self._openai(body)
            return
        self._set_model(body.get("model"))
        usage = body.get("usage")
        if isinstance(usage, dict):
            self._anthropic_usage(usage)
            self._anthropic_final(usage)

    def _openai(self, body: dict[str, Any]) -> None:
        """A chat completion, a chunk of one (usage null but in the last), an embeddings
        list, a response, or a responses stream event carrying its response."""
        kind = body.get("type")
        response = body.get("response")
        if isinstance(kind, str) and kind.startswith("response.") and isinstance(response, dict):
            body = response  # response.created/in_progress (usage null), completed, failed...
        self._set_model(body.get("model"))
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return
        if "prompt_tokens" in usage:  # chat completions, embeddings
            prompt, completion = _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
            if completion is None and "completion_tokens" not in usage:
                completion = (
                    0 if prompt is not None and usage.get("total_tokens") == prompt else None
                )
        else:  # responses
            prompt, completion = _count(usage, "input_tokens"), _count(usage, "output_tokens")
        if prompt is not None and completion is not None:
            self._usage = Usage(prompt, completion)

    def _anthropic_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                self._set_model(message.get("model"))
                usage = message.get("usage")
                if isinstance(usage, dict):
                    self._anthropic_usage(usage)
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._anthropic_usage(usage)  # newer API versions restate the input here
                self._anthropic_final(usage)

    def _anthropic_usage(self, usage: dict[str, Any]) -> None:
        for name in _ANTHROPIC_INPUT:
            count = _count(usage, name)
            if count is not None:
                self._anthropic_input[name] = count

    def _anthropic_final(self, usage: dict[str, Any]) -> None:
        output = _count(usage, "output_tokens")
        if output is not None and "input_tokens" in self._anthropic_input:
            self._usage = Usage(sum(self._anthropic_input.values()), output)

    def _set_model(self, model: Any) -> None:
        if isinstance(model, str) and model:
            self._model = model


def _kind(content_type: str) -> Literal["json", "sse"] | None:
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return "json"
    if media == "text/event-stream":
        return "sse"
    return None


def _count(usage: dict[str, Any], name: str) -> int | None:
    value = usage.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value

"""A local stand-in for the OpenAI and Anthropic APIs that answers and streams like them.

For tests, benchmarks and the first-minute demo: the official SDKs talk to it unchanged
(`/v1/chat/completions`, `/v1/messages`, JSON and server-sent events with usage), so what the
gateway reads from real providers (model, max tokens, usage) is exercised end to end. Replies
are deterministic: `reply_tokens` words ("ok"), cut at the request's max tokens, and the usage
it reports is exactly what it produced; prompt tokens are counted as the request's messages
JSON length / 4, rounded up.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class SeenRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class LlmProvider:
    """`reply_tokens`: words per answer; `token_delay`: seconds between streamed words;
    `delay`: seconds before answering at all (holds a request in flight); `api_key`: when set,
    a request without it (`Authorization: Bearer KEY` or `x-api-key: KEY`) gets 401, as from a
    real provider, so a demo shows the key the gateway injected is the one that counts."""

    reply_tokens: int = 16
    token_delay: float = 0.0
    delay: float = 0.0
    api_key: str | None = None
    seen: list[SeenRequest] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    _runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_get("/v1/models", self._models)
        return app

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> int:
        """Listen; the bound port."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=tls)
        await site.start()
        self._runner = runner
        return int(runner.addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- handlers ---------------------------------------------------------------------------

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.api_key is None or self.api_key in (
            request.headers.get("x-api-key"),
            request.headers.get("Authorization", "").removeprefix("Bearer "),
        ):
            return None
        return _error(401, "authentication_error", "Incorrect API key provided")

    async def _read(self, request: web.Request) -> dict[str, Any] | web.Response:
        if (refused := self._unauthorized(request)) is not None:
            return refused
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "invalid_request_error", "body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "invalid_request_error", "model is required")
        self.seen.append(SeenRequest(request.path, dict(request.headers), body))
        return body

    async def _hold(self) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.delay:
            await asyncio.sleep(self.delay)

    def _words(self, limit: Any) -> int:
        return min(self.reply_tokens, limit) if isinstance(limit, int) else self.reply_tokens

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        words = self._words(limit)
        prompt = _prompt_tokens(body.get("messages"))
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": words,
            "total_tokens": prompt + words,
        }
        finish = "length" if isinstance(limit, int) and limit < self.reply_tokens else "stop"
        ident, created, model = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time()), body["model"]
        await self._hold()
        try:
            if not body.get("stream"):
                return web.json_response(
                    {
                        "id": ident,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": _text(words)},
                                "finish_reason": finish,
                                "logprobs": None,
                            }
                        ],
                        "usage": usage,
                    }
                )
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            stream = await _event_stream(request)

            def chunk(delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
                return {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
                    **({"usage": None} if include_usage else {}),
                }

            await _send(stream, None, chunk({"role": "assistant", "content": ""}, None))
            for i in range(words):
                await self._pace()
                await _send(stream, None, chunk({"content": "ok" if i == 0 else " ok"}, None))
            await _send(stream, None, chunk({}, finish))
            if include_usage:
                last = {**chunk({}, None), "choices": [], "usage": usage}
                await _send(stream, None, last)
            await stream.write(b"data: [DONE]\n\n")
            await stream.write_eof()
            return stream
        finally:
            self.in_flight -= 1

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body.get("max_tokens"), int):
            return _error(400, "invalid_request_error", "max_tokens: Field required")
        limit = body["max_tokens"]
        words = self._words(limit)
        prompt = _prompt_tokens(body.get("messages"))
        stop = "max_tokens" if limit < self.reply_tokens else "end_turn"
        ident, model = f"msg_{uuid.uuid4().hex[:20]}", body["model"]
        await self._hold()
        try:
            if not body.get("stream"):
                return web.json_response(
                    {
                        "id": ident,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [{"type": "text", "text": _text(words)}],
                        "stop_reason": stop,
                        "stop_sequence": None,
                        "usage": {"input_tokens": prompt, "output_tokens": words},
                    }
                )
            stream = await _event_stream(request)
            start = {
                "type": "message_start",
                "message": {
                    "id": ident,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": prompt, "output_tokens": 1},
                },
            }
            await _send(stream, "message_start", start)
            block = {"type": "text", "text": ""}
            await _send(
                stream,
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            )
            await _send(stream, "ping", {"type": "ping"})
            for i in range(words):
                await self._pace()
                delta = {"type": "text_delta", "text": "ok" if i == 0 else " ok"}
                await _send(
                    stream,
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            await _send(stream, "content_block_stop", {"type": "content_block_stop", "index": 0})
            await _send(
                stream,
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": words},
                },
            )
            await _send(stream, "message_stop", {"type": "message_stop"})
            await stream.write_eof()
            return stream
        finally:
            self.in_flight -= 1

    async def _models(self, request: web.Request) -> web.Response:
        if (refused := self._unauthorized(request)) is not None:
            return refused
        models = ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5"]
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in models]}
        )

    async def _pace(self) -> None:
        if self.token_delay:
            await asyncio.sleep(self.token_delay)


def _prompt_tokens(messages: Any) -> int:
    return max(1, math.ceil(len(json.dumps(messages)) / 4))


def _text(words: int) -> str:
    return " ".join(["ok"] * words)


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


async def _event_stream(request: web.Request) -> web.StreamResponse:
    stream = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await stream.prepare(request)
    return stream


async def _send(stream: web.StreamResponse, event: str | None, data: dict[str, Any]) -> None:
    head = f"event: {event}\n" if event else ""
    await stream.write(f"{head}data: {json.dumps(data)}\n\n".encode())

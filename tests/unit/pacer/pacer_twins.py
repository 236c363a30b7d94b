"""In-test twins of the limit store and of the LLM readers, so the pacer is tested alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fnmatch import fnmatchcase

from meshgate.pacing import spec
from meshgate.pacing.store import (
    BudgetState,
    Charge,
    RateDecision,
    Reservation,
    StoreUnavailable,
)


class TwinStore:
    """Token buckets and budget counters in a dict; `down` makes every call fail."""

    def __init__(self) -> None:
        self.down = False
        self.delay = 0.0
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self.spent: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.windows: dict[str, tuple[int, int, int]] = {}  # budget -> (start, end, limit)
        self.open: dict[str, tuple[tuple[Charge, ...], Reservation]] = {}
        self.settled: dict[str, Mapping[str, int]] = {}

    async def _gate(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            raise StoreUnavailable("twin store is down")

    async def hit(self, key: str, requests: int, per_seconds: int) -> RateDecision:
        await self._gate()
        now = time.monotonic()
        rate = requests / per_seconds
        tokens, at = self.buckets.get(key, (float(requests), now))
        tokens = min(float(requests), tokens + (now - at) * rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self.buckets[key] = (tokens, now)
        reset = (requests - tokens) / rate if allowed else (1 - tokens) / rate
        return RateDecision(allowed, requests, int(tokens), reset)

    def state(self, budget: str) -> BudgetState:
        start, end, limit = self.windows[budget]
        return BudgetState(
            budget, start, end, limit, self.spent.get(budget, 0), self.reserved.get(budget, 0)
        )

    async def reserve(
        self, reservation: str, charges: Sequence[Charge], ttl_s: float
    ) -> Reservation:
        await self._gate()
        if reservation in self.open:
            return self.open[reservation][1]
        for c in charges:
            self.windows[c.budget] = (c.window_start, c.window_end, c.limit)
        refused = next(
            (
                c.budget
                for c in charges
                if self.spent.get(c.budget, 0) + self.reserved.get(c.budget, 0) + c.amount > c.limit
            ),
            None,
        )
        if refused is None:
            for c in charges:
                self.reserved[c.budget] = self.reserved.get(c.budget, 0) + c.amount
        answer = Reservation(refused is None, refused, tuple(self.state(c.budget) for c in charges))
        if refused is None:
            self.open[reservation] = (tuple(charges), answer)
        return answer

    async def settle(self, reservation: str, actual: Mapping[str, int]) -> None:
        await self._gate()
        if reservation not in self.open:
            return
        charges, _ = self.open.pop(reservation)
        for c in charges:
            self.reserved[c.budget] -= c.amount
            self.spent[c.budget] = self.spent.get(c.budget, 0) + actual.get(c.budget, c.amount)
        self.settled[reservation] = dict(actual)

    async def budgets(self, prefix: str = "") -> list[BudgetState]:
        return [self.state(b) for b in self.windows if b.startswith(prefix)]

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class TwinRefusal:
    reason: str
    message: str


@dataclass(frozen=True)
class TwinRequest:
    model: str
    body: bytes
    rewritten: bool
    price: spec.Price | None
    max_in: int
    max_out: int
    hooks: TwinLlm = field(repr=False)

    def most(self) -> Mapping[spec.Unit, int]:
        return self.hooks.amounts(self.max_in, self.max_out, self.price)


@dataclass(frozen=True)
class TwinUsage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class TwinReport:
    usage: TwinUsage | None
    model: str | None


class TwinReader:
    def __init__(self, content_type: str) -> None:
        self.sse = content_type.startswith("text/event-stream")
        self.data = bytearray()

    def feed(self, chunk: bytes) -> None:
        self.data += chunk

    def finish(self) -> TwinReport:
        docs = []
        if self.sse:
            for line in bytes(self.data).splitlines():
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                    with contextlib.suppress(ValueError):
                        docs.append(json.loads(line[5:]))
        else:
            with contextlib.suppress(ValueError):
                docs.append(json.loads(self.data))
        for doc in reversed(docs):
            usage = doc.get("usage") if isinstance(doc, dict) else None
            if usage:
                return TwinReport(
                    TwinUsage(usage["prompt_tokens"], usage["completion_tokens"]), doc.get("model")
                )
        return TwinReport(None, None)


class TwinLlm:
    """OpenAI chat only: the model from the body, max_tokens checked or injected, the input
    bounded by the body's size."""

    def read_request(self, llm: spec.LlmSpec, body: bytes, path: str) -> TwinRequest | TwinRefusal:
        try:
            doc = json.loads(body)
            model = doc["model"]
        except (ValueError, KeyError, TypeError):
            return TwinRefusal(spec.BODY_UNREADABLE, "not a JSON body with a model")
        if llm.models and not any(fnmatchcase(model, g) for g in llm.models):
            return TwinRefusal(spec.MODEL_NOT_ALLOWED, f"model {model!r} is not allowed")
        ceiling = llm.max_tokens or 4096
        asked = doc.get("max_tokens")
        rewritten = False
        if asked is None:
            doc["max_tokens"] = asked = ceiling
            body = json.dumps(doc).encode()
            rewritten = True
        elif asked > ceiling:
            return TwinRefusal(spec.MAX_TOKENS_EXCEEDED, f"max_tokens above {ceiling}")
        price = next((p for p in llm.prices if fnmatchcase(model, p.model)), None)
        return TwinRequest(model, body, rewritten, price, len(body), asked, self)

    def unpriced_refusal(
        self, llm: spec.LlmSpec, model: str, budgets: Iterable[spec.BudgetSpec]
    ) -> str | None:
        if any(b.unit == "cost_micro_usd" for b in budgets) and not any(
            fnmatchcase(model, p.model) for p in llm.prices
        ):
            return f"model {model!r} has no price"
        return None

    def amounts(
        self, input_tokens: int, output_tokens: int, price: spec.Price | None
    ) -> Mapping[spec.Unit, int]:
        out: dict[spec.Unit, int] = {
            "requests": 1,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "tokens": input_tokens + output_tokens,
        }
        if price is not None:
            cost = Decimal(price.input) * input_tokens + Decimal(price.output) * output_tokens
            out["cost_micro_usd"] = math.ceil(cost)
        return out

    def usage_reader(self, api: spec.LlmApi, content_type: str, encoding: str) -> TwinReader:
        return TwinReader(content_type)

"""What the pacer needs from the LLM readers (pacing/llm_request, llm_usage, pricing), as one
small interface: the servicer is tested with a twin, and the readers stay pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from meshgate.pacing.spec import BudgetSpec, LlmApi, LlmSpec, Price, Unit


class Usage(Protocol):
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...


class UsageReport(Protocol):
    @property
    def usage(self) -> Usage | None: ...
    @property
    def model(self) -> str | None: ...


class UsageReader(Protocol):
    def feed(self, chunk: bytes) -> None: ...
    def finish(self) -> UsageReport: ...


class LlmRequest(Protocol):
    @property
    def model(self) -> str: ...
    @property
    def body(self) -> bytes: ...
    @property
    def rewritten(self) -> bool: ...
    @property
    def price(self) -> Price | None: ...
    def most(self) -> Mapping[Unit, int]: ...


class Refusal(Protocol):
    @property
    def reason(self) -> str: ...
    @property
    def message(self) -> str: ...


class LlmHooks(Protocol):
    def read_request(self, llm: LlmSpec, body: bytes, path: str) -> LlmRequest | Refusal: ...
    def unpriced_refusal(
        self, llm: LlmSpec, model: str, budgets: Iterable[BudgetSpec]
    ) -> str | None: ...
    def amounts(
        self, input_tokens: int, output_tokens: int, price: Price | None
    ) -> Mapping[Unit, int]: ...
    def usage_reader(self, api: LlmApi, content_type: str, encoding: str) -> UsageReader: ...


def is_refusal(result: LlmRequest | Refusal) -> bool:
    return hasattr(result, "reason")


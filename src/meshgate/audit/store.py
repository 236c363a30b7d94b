"""The interface every audit store implements; ingest and queries use only this."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from meshgate.audit.chain import VerifyReport
from meshgate.audit.record import AuditRecord, Decision


@dataclass(frozen=True)
class AuditQuery:
    agent: str | None = None
    destination: str | None = None
    decision: Decision | None = None
    tool: str | None = None  # MCP tool name (mcp_tool)
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    limit: int = 100
    cursor: str | None = None  # opaque, from the previous page


@dataclass(frozen=True)
class AuditPage:
    records: list[AuditRecord]
    next_cursor: str | None  # None on the last page


class AuditStore(Protocol):
    def append(self, records: Sequence[AuditRecord]) -> int:
        """Store a batch durably (committed on return); a resent record is skipped.

        Returns how many records were new."""

    def query(self, query: AuditQuery) -> AuditPage: ...

    def close(self) -> None: ...


@runtime_checkable
class ValuesStore(Protocol):
    """A store that takes records as their `chain.record_values` (and digests), as the ingest
    decoder sends them: no `AuditRecord` is built for the write (~2 us a record)."""

    def append_values(
        self, values: Sequence[tuple[Any, ...]], digests: Sequence[bytes] | None = None
    ) -> int:
        """`AuditStore.append` for records given as their values."""


# What `summary` can group by: a record field each ("tool" is mcp_tool).
SUMMARY_KEYS = ("agent", "destination", "decision", "tool", "model", "shadow_decision")
SUMMARY_DEFAULT = ("agent", "destination", "decision")


@dataclass(frozen=True)
class SummaryRow:
    """One group: the grouped fields set (the others ""), how many requests, and what the LLM
    calls among them used and cost."""

    agent: str
    destination: str
    decision: Decision | str
    count: int
    tool: str = ""
    model: str = ""
    shadow_decision: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cost_micro_usd: int = 0

    def to_json(self, by: tuple[str, ...] = SUMMARY_DEFAULT) -> dict[str, Any]:
        """The grouped fields and the count; tokens and cost when the group used any."""
        out: dict[str, Any] = {key: getattr(self, key) for key in by}
        out["count"] = self.count
        if self.tokens_in or self.tokens_out or self.cost_micro_usd:
            out.update(
                tokens_in=self.tokens_in,
                tokens_out=self.tokens_out,
                cost_micro_usd=self.cost_micro_usd,
            )
        return out


@dataclass(frozen=True)
class RetainResult:
    batches: int  # whole batches removed
    records: int
    anchor_seq: int  # the first remaining batch must have seq anchor_seq + 1
    anchor_hash: str  # ... and chain to this prev_hash


class AuditLogStore(AuditStore, Protocol):
    """What the SQL stores offer beyond the ingest contract: tail, summary, verify, retention.

    A separate protocol so that an ingest-side fake only needs `AuditStore`."""

    def last_id(self) -> int:
        """The id of the newest record (0 when empty): where `tail -f` starts following."""

    def tail(self, after_id: int, limit: int = 1000) -> list[tuple[int, AuditRecord]]:
        """Records with id > after_id, oldest first (ids grow in append order)."""

    def summary(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        by: tuple[str, ...] = SUMMARY_DEFAULT,
    ) -> list[SummaryRow]:
        """Requests (and tokens, cost) per group of `by` (SUMMARY_KEYS) with
        since <= timestamp < until."""

    def verify(self) -> VerifyReport:
        """Recompute the whole hash chain and say where it breaks."""

    def retain(self, older_than: dt.datetime) -> RetainResult:
        """Delete the oldest whole batches whose records are all older than `older_than`."""

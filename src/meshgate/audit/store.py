"""The interface every audit store implements; ingest and queries use only this."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from meshgate.audit.record import AuditRecord, Decision


@dataclass(frozen=True)
class AuditQuery:
    agent: str | None = None
    destination: str | None = None
    decision: Decision | None = None
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
        """Store a batch durably (committed on return); duplicates by request_id are skipped.

        Returns how many records were new."""

    def query(self, query: AuditQuery) -> AuditPage: ...

    def close(self) -> None: ...

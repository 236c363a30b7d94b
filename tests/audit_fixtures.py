"""Audit test helpers: sample records and store locations (see tests/unit/audit/conftest.py).

A plain module, not a conftest, so tests import it by name (`tests/` is on sys.path) whatever
other conftest.py files a run loads.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshgate.audit.record import DECISIONS, AuditRecord
from meshgate.audit.sqlbase import SqlAuditStore

DEFAULT_PG = "postgresql://meshgate:meshgate@127.0.0.1:5432/meshgate_test"
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def pg_url() -> str:
    return os.environ.get("MESHGATE_TEST_POSTGRES", DEFAULT_PG)


def make_record(i: int, **overrides: Any) -> AuditRecord:
    """Record i: agents a0..a2, destinations d0..d1, decisions cycling, one second apart."""
    fields: dict[str, Any] = {
        "timestamp": T0 + dt.timedelta(seconds=i),
        "request_id": f"req-{i:06d}",
        "agent": f"a{i % 3}",
        "spiffe_id": f"spiffe://mesh.local/agent/a{i % 3}",
        "destination": f"d{i % 2}",
        "host": f"d{i % 2}.example",
        "method": "POST" if i % 5 == 0 else "GET",
        "path": f"/v1/items/{i}?q=ünï",
        "status": 200 if i % 4 == 0 else 403,
        "decision": DECISIONS[i % 4],
        "reason": "" if i % 4 == 0 else "not_allowlisted",
        "bytes_sent": i * 10,
        "bytes_received": i,
        "duration_ms": i / 7,
        "policy_version": "abc123",
        "gateway": "gateway/main",
    }
    fields.update(overrides)
    return AuditRecord(**fields)


def make_records(n: int, start: int = 0) -> list[AuditRecord]:
    return [make_record(i) for i in range(start, start + n)]


@dataclass
class StoreEnv:
    """One store location: open more handles (replicas), or run raw SQL to tamper with it."""

    kind: str
    open: Callable[[], SqlAuditStore]
    raw: Callable[[str, Sequence[Any]], None]  # SQL with ? markers, committed at once


def sqlite_env(tmp_path: Path) -> StoreEnv:
    from meshgate.audit.sqlite_store import SqliteAuditStore

    path = tmp_path / "audit.db"

    def raw(sql: str, params: Sequence[Any] = ()) -> None:
        conn = sqlite3.connect(path)
        with conn:
            conn.execute(sql, tuple(params))
        conn.close()

    return StoreEnv("sqlite", lambda: SqliteAuditStore(path), raw)

"""Audit test helpers: sample records and store locations (see tests/unit/audit/conftest.py).

A plain module, not a conftest, so tests import it by name (`tests/` is on sys.path) whatever
other conftest.py files a run loads.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshgate.audit.record import DECISIONS, AuditRecord
from meshgate.audit.sqlbase import SqlAuditStore

DEFAULT_PG = "postgresql://meshgate:meshgate@127.0.0.1:5432/meshgate_test"
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def pg_url() -> str:
    return os.environ.get("MESHGATE_TEST_POSTGRES", DEFAULT_PG)


@contextmanager
def pg_fresh_schema(prefix: str) -> Iterator[tuple[str, Any, str]]:
    """(URL, an autocommit admin connection, a fresh schema name), the schema dropped after.

    Skips only when MESHGATE_TEST_POSTGRES is set empty; an unreachable server FAILS the test
    (CI starts one: a silent skip would hide the PostgreSQL paths)."""
    url = pg_url()
    if not url:
        pytest.skip("MESHGATE_TEST_POSTGRES is set empty: PostgreSQL tests skipped on request")
    import psycopg

    try:
        admin = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL at {url} is not reachable ({str(exc).strip()}). Start it (.ci/run "
            "does) or set MESHGATE_TEST_POSTGRES= (empty) to skip the PostgreSQL tests.",
            pytrace=False,
        )
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        yield url, admin, schema
    finally:
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()


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

"""Store fixtures: every store test runs against SQLite and PostgreSQL.

PostgreSQL comes from $MESHGATE_TEST_POSTGRES (default: the local CI server, see .ci/run); each
test gets its own schema, dropped afterwards. An unreachable server FAILS the PostgreSQL half;
only an explicitly empty MESHGATE_TEST_POSTGRES skips it.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
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


def _sqlite_env(tmp_path: Path) -> StoreEnv:
    from meshgate.audit.sqlite_store import SqliteAuditStore

    path = tmp_path / "audit.db"

    def raw(sql: str, params: Sequence[Any] = ()) -> None:
        conn = sqlite3.connect(path)
        with conn:
            conn.execute(sql, tuple(params))
        conn.close()

    return StoreEnv("sqlite", lambda: SqliteAuditStore(path), raw)


@pytest.fixture(params=["sqlite", "postgres"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreEnv]:
    if request.param == "sqlite":
        yield _sqlite_env(tmp_path)
        return
    url = pg_url()
    if not url:
        pytest.skip("MESHGATE_TEST_POSTGRES is set empty: PostgreSQL tests skipped on request")
    import psycopg

    from meshgate.audit.postgres_store import PostgresAuditStore

    try:
        admin = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL at {url} is not reachable ({str(exc).strip()}). Start it (.ci/run "
            "does) or set MESHGATE_TEST_POSTGRES= (empty) to skip the PostgreSQL tests.",
            pytrace=False,
        )
    schema = f"t_{uuid.uuid4().hex[:12]}"

    def raw(sql: str, params: Sequence[Any] = ()) -> None:
        admin.execute(f'SET search_path TO "{schema}"')
        admin.execute(sql.replace("?", "%s"), tuple(params))  # type: ignore[arg-type]

    try:
        yield StoreEnv("postgres", lambda: PostgresAuditStore(url, schema=schema), raw)
    finally:
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()


@pytest.fixture
def store(store_env: StoreEnv) -> Iterator[SqlAuditStore]:
    opened = store_env.open()
    yield opened
    opened.close()

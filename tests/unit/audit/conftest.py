"""Store fixtures: every store test runs against SQLite and PostgreSQL.

PostgreSQL comes from $MESHGATE_TEST_POSTGRES (default: the local CI server, see .ci/run); each
test gets its own schema, dropped afterwards. An unreachable server FAILS the PostgreSQL half;
only an explicitly empty MESHGATE_TEST_POSTGRES skips it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from audit_fixtures import StoreEnv, pg_url, sqlite_env

from meshgate.audit.sqlbase import SqlAuditStore


@pytest.fixture(params=["sqlite", "postgres"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreEnv]:
    if request.param == "sqlite":
        yield sqlite_env(tmp_path)
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

"""Store fixtures: every store test runs against SQLite and PostgreSQL.

PostgreSQL comes from $MESHGATE_TEST_POSTGRES (default: the local CI server, see .ci/run); each
test gets its own schema, dropped afterwards. An unreachable server FAILS the PostgreSQL half;
only an explicitly empty MESHGATE_TEST_POSTGRES skips it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from audit_fixtures import StoreEnv, pg_fresh_schema, sqlite_env

from meshgate.audit.sqlbase import SqlAuditStore


@pytest.fixture(params=["sqlite", "postgres"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreEnv]:
    if request.param == "sqlite":
        yield sqlite_env(tmp_path)
        return
    from meshgate.audit.postgres_store import PostgresAuditStore

    with pg_fresh_schema("t") as (url, admin, schema):

        def raw(sql: str, params: Sequence[Any] = ()) -> None:
            admin.execute(f'SET search_path TO "{schema}"')
            admin.execute(sql.replace("?", "%s"), tuple(params))

        yield StoreEnv("postgres", lambda: PostgresAuditStore(url, schema=schema), raw)


@pytest.fixture
def store(store_env: StoreEnv) -> Iterator[SqlAuditStore]:
    opened = store_env.open()
    yield opened
    opened.close()

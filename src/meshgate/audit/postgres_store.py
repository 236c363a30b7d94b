"""The shared audit store: PostgreSQL via psycopg 3, for several control-plane replicas.

Every replica appends through the same chain: a writer locks the single `audit_chain` row
(`SELECT ... FOR UPDATE`) before reading the head, so concurrent appends queue instead of forking
the chain. Tables live in one schema (default `meshgate_audit`), which is also how tests isolate.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from meshgate.audit.sqlbase import SqlAuditStore
from meshgate.errors import ConfigError

DEFAULT_SCHEMA = "meshgate_audit"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class PostgresAuditStore(SqlAuditStore):
    def __init__(self, url: str, *, schema: str = DEFAULT_SCHEMA) -> None:
        try:
            import psycopg
        except ImportError:
            raise ConfigError(
                "the PostgreSQL audit store needs psycopg: pip install 'meshgate[postgres]'"
            ) from None
        if not _IDENTIFIER.match(schema):
            raise ConfigError(f"audit store schema {schema!r} is not a plain SQL identifier")
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise ConfigError(f"cannot connect to the audit store: {exc}".strip()) from None
        super().__init__(conn)
        self.integrity_error = psycopg.IntegrityError
        self.schema = schema
        with conn.transaction():
            # replicas starting together must not race on CREATE TABLE IF NOT EXISTS
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('meshgate_audit_schema'))")
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        conn.execute(f'SET search_path TO "{schema}"')
        with self._write() as cur:
            self._create_schema(cur)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextlib.contextmanager
    def _write(self) -> Iterator[Any]:
        with self._conn.transaction():
            yield self._conn.cursor()

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[Any]:
        with self._conn.transaction():
            cur = self._conn.cursor()
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield cur

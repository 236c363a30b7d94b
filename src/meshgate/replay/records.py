"""Recorded traffic for a replay, read-only and grouped while it streams.

A replay needs six request fields, the recorded outcome and one example per distinct request,
not whole `AuditRecord`s: building a million of those (the store's `query` pages) costs more
than the replay itself. So this reads the documented `audit_records` table (docs/audit.md,
`audit.sqlbase.SCHEMA`) directly, over its own read-only connection, in keyset batches by id
inside one read snapshot, and groups identical rows as they arrive. (A reader of that schema in
audit/ would be the better home; audit/ belongs to another change, so it lives here for now.)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meshgate.audit.chain import from_micros, to_micros
from meshgate.audit.open import parse_target
from meshgate.errors import ConfigError
from meshgate.replay.compare import RecordGroup

BATCH = 50_000
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # as the store checks a schema name
# What makes two records the same request with the same recorded outcome (RecordGroup order).
GROUP_COLUMNS = (
    "agent, spiffe_id, host, method, path, mcp_method, mcp_tool,"
    " CASE WHEN bytes_received > 0 THEN 1 ELSE 0 END,"
    " CASE WHEN gateway LIKE 'gateway/%' THEN 1 ELSE 0 END,"
    " decision, reason, destination, policy_version"
)
KEY_WIDTH = 13
SELECT = f"SELECT {GROUP_COLUMNS}, ts_us, request_id, id FROM audit_records"


def _batch_sql(since: bool, until: bool, marker: str) -> str:
    where = [f"id > {marker}"]
    if since:
        where.append(f"ts_us >= {marker}")
    if until:
        where.append(f"ts_us < {marker}")
    return f"{SELECT} WHERE {' AND '.join(where)} ORDER BY id LIMIT {BATCH}"


def group_rows(
    batches: Iterator[list[tuple[Any, ...]]],
) -> dict[tuple[Any, ...], list[Any]]:
    """key -> [count, first ts_us, first request_id]; rows as `SELECT` returns them."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    get = groups.get
    for rows in batches:
        for row in rows:
            key = row[:KEY_WIDTH]
            found = get(key)
            if found is None:
                groups[key] = [1, row[KEY_WIDTH], row[KEY_WIDTH + 1]]
            else:
                found[0] += 1
    return groups


def to_groups(groups: dict[tuple[Any, ...], list[Any]]) -> Iterator[RecordGroup]:
    for key, (count, ts_us, request_id) in groups.items():
        (
            agent,
            spiffe,
            host,
            method,
            path,
            mcp_method,
            mcp_tool,
            body,
            gw,
            dec,
            reason,
            dest,
            ver,
        ) = key
        yield RecordGroup(
            str(agent),
            str(spiffe),
            str(host),
            str(method),
            str(path),
            str(mcp_method),
            str(mcp_tool),
            bool(body),
            bool(gw),
            str(dec),
            str(reason),
            str(dest),
            int(count),
            str(request_id),
            from_micros(int(ts_us)).isoformat(),
            str(ver),
        )


def _batches(cur: Any, sql: str, bounds: list[int]) -> Iterator[list[tuple[Any, ...]]]:
    after = 0
    while True:
        cur.execute(sql, (after, *bounds))
        rows = cur.fetchall()
        if not rows:
            return
        yield rows
        if len(rows) < BATCH:
            return
        after = int(rows[-1][-1])


def read_groups(
    target: str | Path,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> dict[tuple[Any, ...], list[Any]]:
    """Every record with since <= timestamp < until, grouped; read-only, one snapshot."""
    bounds = [to_micros(t) for t in (since, until) if t is not None]
    parsed = parse_target(target)
    if parsed.kind == "postgresql":
        with _postgres(parsed.location, parsed.schema) as cur:
            sql = _batch_sql(since is not None, until is not None, "%s")
            return group_rows(
                _batches(cur, sql.replace("LIKE 'gateway/%'", "LIKE 'gateway/%%'"), bounds)
            )
    with _sqlite(parsed.location) as cur:
        return group_rows(
            _batches(cur, _batch_sql(since is not None, until is not None, "?"), bounds)
        )


@contextlib.contextmanager
def _sqlite(location: str) -> Iterator[Any]:
    path = Path(location)
    if not path.exists():
        raise ConfigError(f"no audit log at {path} (pass --store)")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open the audit store {path}: {exc}") from None
    try:
        cur = conn.cursor()
        cur.execute("BEGIN")  # one WAL read snapshot for every batch
        try:
            yield cur
        finally:
            cur.execute("COMMIT")
    except sqlite3.Error as exc:
        raise ConfigError(f"audit store {path}: {exc}") from None
    finally:
        conn.close()


def _where(url: str) -> str:
    """Host, port and database: enough to find it, never the password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"


@contextlib.contextmanager
def _postgres(url: str, schema: str | None) -> Iterator[Any]:
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            "a PostgreSQL audit store needs psycopg: pip install 'meshgate[postgres]'"
        ) from None
    from meshgate.audit.postgres_store import DEFAULT_SCHEMA

    schema = schema or DEFAULT_SCHEMA
    if not _IDENTIFIER.fullmatch(schema):
        raise ConfigError(f"audit store schema {schema!r} is not a plain SQL identifier")
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise ConfigError(f"cannot connect to the audit store {_where(url)}: {exc}") from None
    try:
        conn.execute(f'SET search_path TO "{schema}"')
        with conn.transaction():
            cur = conn.cursor()
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield cur
    except psycopg.Error as exc:
        raise ConfigError(f"audit store {_where(url)}: {' '.join(str(exc).split())}") from None
    finally:
        conn.close()

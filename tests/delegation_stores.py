"""Delegation store fixtures shared by unit and e2e tests: the file store, and PostgreSQL in a
schema of its own (dropped afterwards).

PostgreSQL comes from $MESHGATE_TEST_POSTGRES (default: the local CI server, as for the audit
store: tests/audit_fixtures.py); an unreachable server FAILS the PostgreSQL tests, only an
explicitly empty MESHGATE_TEST_POSTGRES skips them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from audit_fixtures import pg_url


@contextmanager
def pg_schema() -> Iterator[str]:
    """A `postgresql://...?schema=<fresh>` URL; the schema is dropped afterwards."""
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
    schema = f"d_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}schema={schema}"
    finally:
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()

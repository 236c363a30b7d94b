"""Delegation store fixtures shared by unit and e2e tests: the file store, and PostgreSQL in a
schema of its own (dropped afterwards).

PostgreSQL comes from $MESHGATE_TEST_POSTGRES (default: the local CI server, as for the audit
store: tests/audit_fixtures.py); an unreachable server FAILS the PostgreSQL tests, only an
explicitly empty MESHGATE_TEST_POSTGRES skips them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from audit_fixtures import pg_fresh_schema


@contextmanager
def pg_schema() -> Iterator[str]:
    """A `postgresql://...?schema=<fresh>` URL; the schema is dropped afterwards."""
    with pg_fresh_schema("d") as (url, _, schema):
        sep = "&" if "?" in url else "?"
        yield f"{url}{sep}schema={schema}"

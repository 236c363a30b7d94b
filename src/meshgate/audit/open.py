"""Where the audit log lives, from a URL or a path: the one place that picks a store class."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from meshgate.audit.sqlbase import SqlAuditStore
from meshgate.errors import ConfigError

STORE_ENV = "MESHGATE_AUDIT_STORE"
DEFAULT_FILE = "audit.db"


@dataclass(frozen=True)
class StoreTarget:
    kind: str  # "sqlite" or "postgresql"
    location: str  # the file path, or the libpq URL without our `schema` parameter
    schema: str | None = None


def store_target(store: str | None, state_dir: Path) -> str:
    """An explicit --store, else $MESHGATE_AUDIT_STORE, else `<state_dir>/audit.db`."""
    return store or os.environ.get(STORE_ENV) or str(state_dir / DEFAULT_FILE)


def parse_target(target: str | Path) -> StoreTarget:
    """`sqlite:///abs/path` (or SQLAlchemy's `sqlite:////abs/path`), `sqlite:relative.db` or
    a plain path -> SQLite;
    `postgresql://...[?schema=name]` (or `postgres://`) -> PostgreSQL in that schema."""
    text = str(target)
    scheme = text.split(":", 1)[0].lower() if "://" in text or text.startswith("sqlite:") else ""
    if scheme in ("postgresql", "postgres"):
        url, schema = _split_schema(text)
        return StoreTarget("postgresql", url, schema)
    if scheme == "sqlite":
        path = text[len("sqlite:") :]
        path = path[2:] if path.startswith("//") else path  # sqlite:///abs -> /abs
        path = "/" + path.lstrip("/") if path.startswith("/") else path  # sqlite:////abs too
        if not path:
            raise ConfigError(f"audit store {text!r} names no file")
        return StoreTarget("sqlite", path)
    if scheme:
        raise ConfigError(f"audit store {text!r}: use a path, sqlite:///path or postgresql://")
    if not text:
        raise ConfigError("audit store: empty path")
    return StoreTarget("sqlite", text)


def open_store(target: str | Path) -> SqlAuditStore:
    """Open (and create if needed) the store `target` names; see `parse_target`."""
    parsed = parse_target(target)
    if parsed.kind == "postgresql":
        from meshgate.audit.postgres_store import DEFAULT_SCHEMA, PostgresAuditStore

        return PostgresAuditStore(parsed.location, schema=parsed.schema or DEFAULT_SCHEMA)
    from meshgate.audit.sqlite_store import SqliteAuditStore

    return SqliteAuditStore(parsed.location)


def _split_schema(url: str) -> tuple[str, str | None]:
    """Take our `schema` parameter out of the URL; libpq would refuse it."""
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in params if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in params if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema

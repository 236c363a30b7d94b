"""Sub-agents in PostgreSQL (psycopg 3): one registry for every control-plane replica.

A replica's refresh thread (controlplane/delegation.py) re-reads the table every second, so a
sub-agent created, revoked or expired through one replica reaches the others' gateways and sidecars
within about a second. Every write (add, remove_tree, discard) is one transaction that first takes
one advisory lock shared by every replica (writes are rare): two replicas checking `maxSubAgents`,
or the same child name, queue instead of both succeeding, and a create that read its parent cannot
insert after another replica deleted that parent (an orphan a later parent of the same name would
inherit). The primary key refuses a duplicate name regardless. The gateway key is one row inserted
once (ON CONFLICT DO NOTHING), so every replica serves the same one.

Connections come from a small pool (`_POOL` idle at most), one per operation: the registry is
called from several worker threads and a psycopg transaction must not be shared; no Python lock
is held while the database answers. A database that stops answering must not hold a thread for
the kernel's ~15 minutes: connections are made with `CONNECT` (connect, statement and TCP
timeouts, keepalives) unless the URL sets them, and a watchdog shuts the socket of an operation
still waiting after `OPERATION_TIMEOUT` (a server, or a proxy in front of it, that acknowledges
and then goes silent defeats every timeout the kernel and the server keep). Tables live in a
schema (default `meshgate_delegation`), named like the audit store's (`?schema=` in the URL).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from meshgate.delegation.expand import SubAgent
from meshgate.delegation.rights import DelegationError
from meshgate.delegation.stores import (
    DelegationStoreError,
    Make,
    from_json,
    new_key,
    to_json,
)
from meshgate.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_SCHEMA = "meshgate_delegation"
TABLE = "delegation_sub_agents"
KEYS = "delegation_keys"
GATEWAY_KEY = "gateway-key"
_POOL = 4
# libpq parameters, unless the URL sets its own
CONNECT: dict[str, str | int] = {
    "connect_timeout": 3,
    "options": "-c statement_timeout=3000",
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 5000,
}
OPERATION_TIMEOUT = 6.0  # seconds an operation may wait on the database, whatever it waits for
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# one advisory lock for every writer of every replica (of this schema), held to the end of
# its transaction
_WRITE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('meshgate_delegation_writes:' || %s))"

SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        name TEXT PRIMARY KEY,
        parent TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        token_id TEXT NOT NULL DEFAULT '',
        doc TEXT NOT NULL)""",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_parent ON {TABLE} (parent)",
    f"CREATE TABLE IF NOT EXISTS {KEYS} (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"


class PostgresSubAgentStore:
    def __init__(self, url: str, *, schema: str = DEFAULT_SCHEMA) -> None:
        try:
            import psycopg
        except ImportError:
            raise ConfigError(
                "the PostgreSQL delegation store needs psycopg: pip install 'meshgate[postgres]'"
            ) from None
        if not _IDENTIFIER.match(schema):
            raise ConfigError(f"delegation store schema {schema!r} is not a plain SQL identifier")
        self.url, self.schema = url, schema
        self._error = psycopg.Error
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        try:
            conn = self._connect()
        except DelegationStoreError as exc:
            raise ConfigError(f"cannot connect to the delegation store {exc}") from None
        watchdog = _Watchdog(conn)
        try:
            with conn.transaction():
                # replicas starting together must not race on CREATE ... IF NOT EXISTS
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('meshgate_delegation_schema'))")
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                conn.execute(f'SET search_path TO "{schema}"')
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    f"INSERT INTO {KEYS} VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    (GATEWAY_KEY, new_key()),
                )
                row = conn.execute(f"SELECT value FROM {KEYS} WHERE name = %s", (GATEWAY_KEY,))
                self._key = str(row.fetchone()[0])
        except psycopg.Error as exc:
            conn.close()
            why = f"no answer in {OPERATION_TIMEOUT:.0f}s" if watchdog.stop() else _one_line(exc)
            raise ConfigError(f"delegation store {_where(url)}: {why}") from None
        if watchdog.stop():
            conn.close()
        else:
            self._idle.put(conn)

    # -- connections ----------------------------------------------------------------------------

    def _connect(self) -> Any:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        try:
            given = conninfo_to_dict(self.url)
            params = {k: v for k, v in CONNECT.items() if k not in given}
            conn = psycopg.connect(make_conninfo(self.url, **params), autocommit=True)
        except psycopg.Error as exc:
            raise DelegationStoreError(f"{_where(self.url)}: {_one_line(exc)}") from None
        watchdog = _Watchdog(conn)
        try:
            conn.execute(f'SET search_path TO "{self.schema}"')
        except psycopg.Error as exc:
            conn.close()
            why = f"no answer in {OPERATION_TIMEOUT:.0f}s" if watchdog.stop() else _one_line(exc)
            raise DelegationStoreError(f"{_where(self.url)}: {why}") from None
        if watchdog.stop():  # answered just as it fired: the socket is shut
            conn.close()
            raise DelegationStoreError(f"{_where(self.url)}: no answer in {OPERATION_TIMEOUT:.0f}s")
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A connection of its own for one transaction; DelegationStoreError if the database
        fails or does not answer within OPERATION_TIMEOUT (a broken connection is dropped, the
        next call opens another)."""
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._connect()
        watchdog = _Watchdog(conn)
        try:
            with conn.transaction():
                yield conn
        except self._error as exc:
            stalled = watchdog.stop()
            conn.close()
            self.close()  # after a server restart every idle connection is broken too
            if stalled:
                raise Stalled(
                    f"delegation store {_where(self.url)}: no answer in {OPERATION_TIMEOUT:.0f}s"
                ) from None
            raise DelegationStoreError(
                f"delegation store {_where(self.url)}: {_one_line(exc)}"
            ) from None
        except BaseException:
            if watchdog.stop() or conn.broken:
                conn.close()
            elif self._idle.qsize() < _POOL:
                self._idle.put(conn)
            else:
                conn.close()
            raise
        if watchdog.stop() or conn.broken or self._idle.qsize() >= _POOL:
            conn.close()
        else:
            self._idle.put(conn)

    # -- SubAgentStore --------------------------------------------------------------------------

    def load(self) -> list[SubAgent]:
        try:
            rows = self._rows()
        except Stalled:
            raise  # once is enough to wait
        except DelegationStoreError:  # a connection the server dropped: once more, afresh
            rows = self._rows()
        return _readable(rows)

    def _rows(self) -> list[Any]:
        with self._transaction() as conn:
            return list(conn.execute(f"SELECT doc, token_id FROM {TABLE}").fetchall())

    def add(self, parent: str, make: Make) -> SubAgent:
        from psycopg.errors import UniqueViolation

        with self._transaction() as conn:
            conn.execute(_WRITE_LOCK, (self.schema,))
            rows = conn.execute(
                f"SELECT doc, token_id FROM {TABLE} WHERE parent = %s OR name = %s",
                (parent, parent),
            ).fetchall()
            subs = _readable(rows)
            own = next((s for s in subs if s.name == parent), None)
            sub = make([s for s in subs if s.name != parent], own)
            exists = DelegationError(f"{sub.name!r} exists already (delete it first)")
            if any(s.name == sub.name for s in subs):
                raise exists
            try:
                conn.execute(
                    f"INSERT INTO {TABLE} (name, parent, created_at, expires_at, token_id, doc)"
                    " VALUES (%s, %s, %s, %s, %s, %s)",
                    (sub.name, sub.parent, sub.created_at, sub.expires_at, sub.token_id,
                     _doc(sub)),
                )  # fmt: skip
            except UniqueViolation:  # the lock makes this unreachable; the key makes it sure
                raise exists from None
        return sub

    def remove_tree(self, name: str) -> list[SubAgent]:
        with self._transaction() as conn:
            conn.execute(_WRITE_LOCK, (self.schema,))
            rows = conn.execute(
                f"DELETE FROM {TABLE} WHERE name = %s OR starts_with(name, %s)"
                " RETURNING doc, token_id",
                (name, name + "."),
            ).fetchall()
        return sorted((_row(r) for r in rows), key=lambda s: s.name)

    def discard(self, subs: Sequence[SubAgent]) -> None:
        if not subs:
            return
        with self._transaction() as conn:
            conn.execute(_WRITE_LOCK, (self.schema,))
            for s in subs:
                conn.execute(
                    f"DELETE FROM {TABLE} WHERE name = %s AND created_at = %s AND expires_at = %s",
                    (s.name, s.created_at, s.expires_at),
                )

    def gateway_key(self) -> str:
        return self._key

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class Stalled(DelegationStoreError):
    """The database did not answer within OPERATION_TIMEOUT."""


class _Watchdog:
    """Shuts down `conn`'s socket if the operation is still running after OPERATION_TIMEOUT:
    libpq's wait then ends with an error instead of waiting for the kernel to give up."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._done = False
        self.fired = False
        self._timer = threading.Timer(OPERATION_TIMEOUT, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            try:
                fd = os.dup(self._conn.pgconn.socket)
            except Exception:  # closed meanwhile: nothing to wake
                return
        with socket.socket(fileno=fd) as sock, contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # the connection, not just this descriptor

    def stop(self) -> bool:
        """The operation ended; True when the watchdog had fired (the connection is useless)."""
        self._timer.cancel()
        with self._lock:
            self._done = True
            return self.fired


def _doc(sub: SubAgent) -> str:
    doc = to_json(sub)
    del doc["token_id"]  # its own column
    return json.dumps(doc, sort_keys=True)


def _readable(rows: Sequence[Sequence[Any]]) -> list[SubAgent]:
    out = []
    for row in rows:
        try:
            out.append(_row(row))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            # fail closed for that sub-agent (no rights), not for the mesh
            log.error("delegation store: an unreadable sub-agent row, ignored: %s", exc)
    return out


def _row(row: Sequence[Any]) -> SubAgent:
    doc = json.loads(row[0])
    doc["token_id"] = row[1]
    return from_json(doc)

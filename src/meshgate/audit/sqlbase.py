"""The SQL both stores share: schema, batched append into the chain, queries, verify, retention.

SQLite and PostgreSQL differ only in how they connect, how a writer takes the chain lock and the
parameter marker; those are the subclass hooks. All SQL here is written with `?` markers and
portable types (PostgreSQL >= 9.5 and SQLite >= 3.24 both take ON CONFLICT DO NOTHING and row
value comparisons).

Rows are narrow: one column per AuditRecord field, timestamps as UTC microseconds (BIGINT) so
keyset pagination and the chain's canonical encoding see the same integer in both stores. Ids are
assigned by the writer under the chain lock, contiguous across batches, which is what lets
`verify` name a deleted record by id.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from meshgate.audit.chain import (
    GENESIS,
    Batch,
    ChainState,
    Verifier,
    VerifyReport,
    from_micros,
    make_batch,
    record_values,
    to_micros,
)
from meshgate.audit.query import decode_cursor, encode_cursor
from meshgate.audit.record import AuditRecord
from meshgate.audit.retention import plan_retention
from meshgate.audit.store import (
    SUMMARY_DEFAULT,
    SUMMARY_KEYS,
    AuditLogStore,
    AuditPage,
    AuditQuery,
    RetainResult,
    SummaryRow,
)
from meshgate.errors import ConfigError, MeshgateError

FIELDS = (
    "request_id",
    "agent",
    "spiffe_id",
    "destination",
    "host",
    "method",
    "path",
    "status",
    "decision",
    "reason",
    "bytes_sent",
    "bytes_received",
    "duration_ms",
    "policy_version",
    "gateway",
    "mcp_method",
    "mcp_tool",
    "model",
    "tokens_in",
    "tokens_out",
    "cost_micro_usd",
    "mcp_args_digest",
    "shadow_decision",
    "shadow_reason",
    "delegation_chain",
)
RECORD_COLUMNS = "id, ts_us, " + ", ".join(FIELDS)
GATEWAY = 1 + FIELDS.index("gateway")  # its position in `record_values`
IN_CHUNK = 500  # request_ids per IN (...) lookup
ROW_WIDTH = 2 + len(FIELDS)  # values per inserted row
BATCH_PAGE = 200  # batch rows read at a time by verify

RecordKey = tuple[int, str, str]


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit_records (
        id {id_type} PRIMARY KEY,
        ts_us BIGINT NOT NULL,
        request_id TEXT NOT NULL,
        agent TEXT NOT NULL,
        spiffe_id TEXT NOT NULL,
        destination TEXT NOT NULL,
        host TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        status INTEGER NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        bytes_sent BIGINT NOT NULL,
        bytes_received BIGINT NOT NULL,
        duration_ms DOUBLE PRECISION NOT NULL,
        policy_version TEXT NOT NULL,
        gateway TEXT NOT NULL,
        mcp_method TEXT NOT NULL DEFAULT '',
        mcp_tool TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        tokens_in BIGINT NOT NULL DEFAULT 0,
        tokens_out BIGINT NOT NULL DEFAULT 0,
        cost_micro_usd BIGINT NOT NULL DEFAULT 0,
        mcp_args_digest TEXT NOT NULL DEFAULT '',
        shadow_decision TEXT NOT NULL DEFAULT '',
        shadow_reason TEXT NOT NULL DEFAULT '',
        delegation_chain TEXT NOT NULL DEFAULT '')""",
    "CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records (ts_us, id)",
    # A resent record (a shipper retrying after a crash) repeats its spool line, start time
    # included, so (time, request id) finds it; ordered by time first, this index grows at its
    # end like the table, where a request-id-only index took one random page per record.
    # (the logging node is part of the key: no node can pre-empt another's records)
    "CREATE UNIQUE INDEX IF NOT EXISTS audit_records_request"
    " ON audit_records (ts_us, request_id, gateway)",
    "CREATE INDEX IF NOT EXISTS audit_records_agent ON audit_records (agent, ts_us, id)",
    "CREATE INDEX IF NOT EXISTS audit_records_decision ON audit_records (decision, ts_us, id)",
    "CREATE INDEX IF NOT EXISTS audit_records_dest ON audit_records (destination, ts_us, id)",
    # (audit_records_tool is created by MIGRATIONS, after a store from before it has the column)
    """CREATE TABLE IF NOT EXISTS audit_batches (
        seq BIGINT PRIMARY KEY,
        first_id BIGINT NOT NULL,
        last_id BIGINT NOT NULL,
        count INTEGER NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        digests {blob_type} NOT NULL,
        min_ts_us BIGINT NOT NULL,
        max_ts_us BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS audit_chain (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        anchor_seq BIGINT NOT NULL,
        anchor_hash TEXT NOT NULL,
        anchor_last_id BIGINT NOT NULL,
        head_seq BIGINT NOT NULL,
        head_hash TEXT NOT NULL,
        head_last_id BIGINT NOT NULL)""",
    f"""INSERT INTO audit_chain VALUES (1, 0, '{GENESIS}', 0, 0, '{GENESIS}', 0)
        ON CONFLICT DO NOTHING""",
)
# Columns added after the first release, with the statement that adds each to an older store
# (both engines take ADD COLUMN with a constant default; existing rows read as ''). Applied at
# open, under the same lock as the schema.
ADDED_COLUMNS = (
    ("mcp_method", "ALTER TABLE audit_records ADD COLUMN mcp_method TEXT NOT NULL DEFAULT ''"),
    ("mcp_tool", "ALTER TABLE audit_records ADD COLUMN mcp_tool TEXT NOT NULL DEFAULT ''"),
    ("model", "ALTER TABLE audit_records ADD COLUMN model TEXT NOT NULL DEFAULT ''"),
    ("tokens_in", "ALTER TABLE audit_records ADD COLUMN tokens_in BIGINT NOT NULL DEFAULT 0"),
    ("tokens_out", "ALTER TABLE audit_records ADD COLUMN tokens_out BIGINT NOT NULL DEFAULT 0"),
    (
        "cost_micro_usd",
        "ALTER TABLE audit_records ADD COLUMN cost_micro_usd BIGINT NOT NULL DEFAULT 0",
    ),
    (
        "mcp_args_digest",
        "ALTER TABLE audit_records ADD COLUMN mcp_args_digest TEXT NOT NULL DEFAULT ''",
    ),
    (
        "shadow_decision",
        "ALTER TABLE audit_records ADD COLUMN shadow_decision TEXT NOT NULL DEFAULT ''",
    ),
    (
        "shadow_reason",
        "ALTER TABLE audit_records ADD COLUMN shadow_reason TEXT NOT NULL DEFAULT ''",
    ),
    (
        "delegation_chain",
        "ALTER TABLE audit_records ADD COLUMN delegation_chain TEXT NOT NULL DEFAULT ''",
    ),
)
MIGRATIONS = (
    "CREATE INDEX IF NOT EXISTS audit_records_tool ON audit_records (mcp_tool, ts_us, id)",
)
CHAIN_COLUMNS = "anchor_seq, anchor_hash, anchor_last_id, head_seq, head_hash, head_last_id"
BATCH_COLUMNS = "seq, first_id, last_id, count, prev_hash, hash, digests, min_ts_us, max_ts_us"


_SUMMARY_COLUMNS = {key: "mcp_tool" if key == "tool" else key for key in SUMMARY_KEYS}


def row_record(row: Sequence[Any]) -> tuple[int, AuditRecord]:
    """(id, record) from a row selected as RECORD_COLUMNS."""
    values = dict(zip(FIELDS, row[2:], strict=True))
    values["duration_ms"] = float(values["duration_ms"])
    return int(row[0]), AuditRecord(timestamp=from_micros(int(row[1])), **values)


def batch_from_row(row: Sequence[Any]) -> Batch:
    seq, first_id, last_id, count, prev_hash, hash_, digests, min_ts, max_ts = row
    return Batch(
        int(seq),
        int(first_id),
        int(last_id),
        int(count),
        str(prev_hash),
        str(hash_),
        bytes(digests),
        int(min_ts),
        int(max_ts),
    )


def time_filters(
    since: dt.datetime | None, until: dt.datetime | None
) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        where.append("ts_us >= ?")
        params.append(to_micros(since))
    if until is not None:
        where.append("ts_us < ?")
        params.append(to_micros(until))
    return where, params


def select_page(query: AuditQuery) -> tuple[str, list[Any]]:
    """Newest first, keyset on (ts_us, id): each page starts strictly after the cursor."""
    where, params = time_filters(query.since, query.until)
    for column, value in (
        ("agent", query.agent),
        ("destination", query.destination),
        ("decision", query.decision),
        ("mcp_tool", query.tool),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if query.cursor:
        ts_us, record_id = decode_cursor(query.cursor)
        where.append("(ts_us, id) < (?, ?)")
        params += [ts_us, record_id]
    sql = f"SELECT {RECORD_COLUMNS} FROM audit_records"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts_us DESC, id DESC LIMIT ?"
    params.append(query.limit + 1)
    return sql, params


class AuditStoreError(MeshgateError):
    """The store's contents contradict its chain: appending would fork or corrupt it."""


class SqlAuditStore:
    """An AuditLogStore over a DB-API connection; subclasses supply the dialect hooks."""

    id_type = "BIGINT"
    blob_type = "BYTEA"
    chain_lock = " FOR UPDATE"  # appended to the chain-row SELECT inside a write transaction
    integrity_error: type[Exception] = Exception  # the driver's IntegrityError

    def __init__(self, conn: Any) -> None:
        self._conn = conn  # sqlite3.Connection or psycopg.Connection: DB-API is untyped here
        self._lock = threading.Lock()  # one connection, shared by ingest and query threads

    # -- dialect hooks -------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql

    @contextlib.contextmanager
    def _write(self) -> Iterator[Any]:
        """A transaction that the caller makes exclusive by reading the chain row locked."""
        raise NotImplementedError
        yield

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[Any]:
        """A read-only transaction seeing one consistent state across statements."""
        raise NotImplementedError
        yield

    def _insert(self, cur: Any, first_id: int, values: Sequence[tuple[Any, ...]]) -> int:
        """Insert records with ids from `first_id` (each row: its id, then its
        `record_values`); how many were inserted."""
        raise NotImplementedError

    def _cursor(self) -> Any:
        return self._conn.cursor()

    # -- helpers -------------------------------------------------------------------------------

    def _exec(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._sql(sql), tuple(params))
        return cur

    def _create_schema(self, cur: Any) -> None:
        for statement in SCHEMA:
            self._exec(cur, statement.format(id_type=self.id_type, blob_type=self.blob_type))
        present = self._columns(cur)
        for column, add in ADDED_COLUMNS:
            if column not in present:  # a store created before this column existed
                self._exec(cur, add)
        for statement in MIGRATIONS:
            self._exec(cur, statement)

    def _columns(self, cur: Any) -> set[str]:
        """The columns audit_records has now (the dialect's catalogue)."""
        raise NotImplementedError

    def _chain(self, cur: Any, lock: bool) -> ChainState:
        suffix = self.chain_lock if lock else ""
        row = self._exec(cur, f"SELECT {CHAIN_COLUMNS} FROM audit_chain WHERE id = 1{suffix}")
        return ChainState(*row.fetchone())

    def _existing(self, cur: Any, keys: list[RecordKey]) -> set[RecordKey]:
        """Which (ts_us, request_id, gateway) keys are stored already: index seeks on the start
        times (a plain IN list, which both engines turn into seeks), the rest compared here."""
        wanted = set(keys)
        stamps = sorted({ts for ts, _, _ in keys})
        found: set[RecordKey] = set()
        for i in range(0, len(stamps), IN_CHUNK):
            chunk = stamps[i : i + IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT ts_us, request_id, gateway FROM audit_records WHERE ts_us IN ({marks})"
            rows = self._exec(cur, sql, chunk).fetchall()
            found.update(k for r in rows if (k := (int(r[0]), str(r[1]), str(r[2]))) in wanted)
        return found

    # -- AuditStore ----------------------------------------------------------------------------

    def append(self, records: Sequence[AuditRecord]) -> int:
        """One transaction: lock the chain row, skip known request_ids, insert, link the batch."""
        return self.append_values([record_values(r) for r in records])

    def append_values(
        self, values: Sequence[tuple[Any, ...]], digests: Sequence[bytes] | None = None
    ) -> int:
        """`append` for records given as their `record_values` (each computed once: it gives
        the key, the row and the digest), with their `values_digest`s if the caller has them
        (the ingest decoder computes them in its own process)."""
        if digests is not None and len(digests) != len(values):
            raise ValueError(f"{len(values)} records but {len(digests)} digests")
        # what makes a record the same record: a resend repeats its time, id and node
        keys: list[RecordKey] = [(v[0], v[1], v[GATEWAY]) for v in values]
        if len(set(keys)) != len(keys):  # a record repeated within the batch: keep one copy
            pick = {k: i for i, k in reversed(list(enumerate(keys)))}  # as before: the first
            # copy, placed where the last one was
            chosen = list(pick.values())[::-1]
            values, keys = [values[i] for i in chosen], [keys[i] for i in chosen]
            if digests is not None:
                digests = [digests[i] for i in chosen]
        if not values:
            return 0
        with self._lock, self._write() as cur:
            state = self._chain(cur, lock=True)
            known = self._existing(cur, keys)
            if known:
                fresh = [i for i, key in enumerate(keys) if key not in known]
                values = [values[i] for i in fresh]
                if digests is not None:
                    digests = [digests[i] for i in fresh]
            if not values:
                return 0
            new = len(values)
            batch = make_batch(state, (), values, digests)
            try:
                inserted = self._insert(cur, batch.first_id, values)
            except self.integrity_error as exc:
                raise AuditStoreError(
                    f"audit store: record ids from {batch.first_id} are taken though the chain "
                    f"ends at {state.head_last_id}; run `meshgate audit verify` ({exc})"
                ) from None
            if inserted != new:  # impossible under the chain lock; never fork it
                raise RuntimeError(f"audit append inserted {inserted} of {new} records")
            self._exec(
                cur,
                f"INSERT INTO audit_batches ({BATCH_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    batch.seq,
                    batch.first_id,
                    batch.last_id,
                    batch.count,
                    batch.prev_hash,
                    batch.hash,
                    batch.digests,
                    batch.min_ts_us,
                    batch.max_ts_us,
                ),
            )
            self._exec(
                cur,
                "UPDATE audit_chain SET head_seq = ?, head_hash = ?, head_last_id = ? WHERE id = 1",
                (batch.seq, batch.hash, batch.last_id),
            )
            return new

    def query(self, query: AuditQuery) -> AuditPage:
        sql, params = select_page(query)
        with self._lock, self._snapshot() as cur:
            rows = self._exec(cur, sql, params).fetchall()
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        cursor = encode_cursor(int(rows[-1][1]), int(rows[-1][0])) if more else None
        return AuditPage([row_record(r)[1] for r in rows], cursor)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- AuditLogStore -------------------------------------------------------------------------

    def last_id(self) -> int:
        with self._lock, self._snapshot() as cur:
            row = self._exec(cur, "SELECT COALESCE(MAX(id), 0) FROM audit_records").fetchone()
        return int(row[0])

    def tail(self, after_id: int, limit: int = 1000) -> list[tuple[int, AuditRecord]]:
        sql = f"SELECT {RECORD_COLUMNS} FROM audit_records WHERE id > ? ORDER BY id LIMIT ?"
        with self._lock, self._snapshot() as cur:
            rows = self._exec(cur, sql, (after_id, limit)).fetchall()
        return [row_record(r) for r in rows]

    def summary(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        by: tuple[str, ...] = SUMMARY_DEFAULT,
    ) -> list[SummaryRow]:
        unknown = [key for key in by if key not in SUMMARY_KEYS]
        if unknown or not by or len(set(by)) != len(by):
            raise ConfigError(
                f"summary by {','.join(by)}: give one or more of {', '.join(SUMMARY_KEYS)}"
            )
        columns = ", ".join(_SUMMARY_COLUMNS[key] for key in by)  # names from a fixed table
        where, params = time_filters(since, until)
        sql = (
            f"SELECT {columns}, COUNT(*), SUM(tokens_in), SUM(tokens_out), SUM(cost_micro_usd)"
            " FROM audit_records"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" GROUP BY {columns} ORDER BY {columns}"
        with self._lock, self._snapshot() as cur:
            rows = self._exec(cur, sql, params).fetchall()
        out = []
        for row in rows:
            keys = dict(zip(by, row, strict=False))
            n, tokens_in, tokens_out, cost = row[len(by) :]
            out.append(
                SummaryRow(
                    keys.get("agent", ""),
                    keys.get("destination", ""),
                    keys.get("decision", ""),
                    int(n),
                    tool=keys.get("tool", ""),
                    model=keys.get("model", ""),
                    shadow_decision=keys.get("shadow_decision", ""),
                    tokens_in=int(tokens_in or 0),
                    tokens_out=int(tokens_out or 0),
                    cost_micro_usd=int(cost or 0),
                )
            )
        return out

    def verify(self) -> VerifyReport:
        """Walk every batch from the anchor in one read snapshot; see chain.Verifier."""
        select_range = f"SELECT {RECORD_COLUMNS} FROM audit_records WHERE id >= ? AND id <= ?"
        with self._lock, self._snapshot() as cur:
            verifier = Verifier(self._chain(cur, lock=False))
            after = verifier.state.anchor_seq
            while True:
                page = self._exec(
                    cur,
                    f"SELECT {BATCH_COLUMNS} FROM audit_batches WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, BATCH_PAGE),
                ).fetchall()
                if not page:
                    break
                for row in page:
                    batch = batch_from_row(row)
                    gap = verifier.gap_range(batch)
                    if gap is not None:
                        strays = self._exec(cur, select_range + " ORDER BY id", gap).fetchall()
                        verifier.unchained((r[0], r[2]) for r in strays)
                    records = self._exec(
                        cur, select_range + " ORDER BY id", (batch.first_id, batch.last_id)
                    ).fetchall()
                    verifier.batch(batch, (row_record(r) for r in records))
                after = page[-1][0]
            outside = self._exec(
                cur,
                "SELECT id, request_id FROM audit_records WHERE id <= ? OR id > ? ORDER BY id",
                (verifier.state.anchor_last_id, verifier.last_id),
            ).fetchall()
            verifier.unchained((int(i), str(r)) for i, r in outside)
        return verifier.finish()

    def retain(self, older_than: dt.datetime) -> RetainResult:
        """Drop the oldest batches wholly before `older_than`; the chain row keeps the anchor."""
        cutoff = to_micros(older_than)
        with self._lock, self._write() as cur:
            state = self._chain(cur, lock=True)
            rows = self._exec(
                cur,
                "SELECT seq, last_id, max_ts_us, hash FROM audit_batches WHERE seq > ? "
                "ORDER BY seq",
                (state.anchor_seq,),
            ).fetchall()
            plan = plan_retention(rows, cutoff)
            if plan is None:
                return RetainResult(0, 0, state.anchor_seq, state.anchor_hash)
            removed = self._exec(
                cur, "DELETE FROM audit_records WHERE id <= ?", (plan.last_id,)
            ).rowcount
            self._exec(cur, "DELETE FROM audit_batches WHERE seq <= ?", (plan.seq,))
            self._exec(
                cur,
                "UPDATE audit_chain SET anchor_seq = ?, anchor_hash = ?, anchor_last_id = ? "
                "WHERE id = 1",
                (plan.seq, plan.hash, plan.last_id),
            )
            return RetainResult(plan.batches, int(removed), plan.seq, plan.hash)


def _conforms(store: SqlAuditStore) -> AuditLogStore:
    """Never called: mypy checks here that the SQL stores implement the whole protocol."""
    return store

"""`meshgate audit ...`: query, follow, summarise, verify and prune the audit log.

The store is found as `--store URL`, else $MESHGATE_AUDIT_STORE, else `<--state-dir>/audit.db`
(the control plane's default); `query` and `summary` can instead ask a running control plane's
admin API (`--control-plane URL`, with its operator token: `meshgate.adminclient`). Every expected
failure is one line on stderr and exit 1.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from meshgate.audit.open import STORE_ENV, open_store, parse_target, store_target
from meshgate.audit.query import build_query, parse_instant
from meshgate.audit.record import DECISIONS, AuditRecord
from meshgate.audit.sqlbase import SqlAuditStore
from meshgate.audit.store import SUMMARY_DEFAULT, SUMMARY_KEYS, AuditPage, AuditQuery, SummaryRow
from meshgate.cli import admin
from meshgate.cli.audit_render import line, print_records, print_summary, report_text
from meshgate.cli.common import fail
from meshgate.cli.options import (
    DEFAULT_STATE,
    AuditAdminTokenFileOpt,
    AuditControlPlaneOpt,
    LinesFormatOpt,
    RecordsFormatOpt,
    StateOpt,
    StoreOpt,
    TextOrJsonOpt,
    UntilOpt,
    WideOpt,
)
from meshgate.cli.output import Format, console, err_console, json_line, print_json_line
from meshgate.durations import parse_duration
from meshgate.errors import ConfigError, MeshgateError

audit_app = typer.Typer(
    help="The audit log: query, tail, summary, verify, retain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SinceOpt = Annotated[
    str | None, typer.Option(help="From this time: a duration back (1h, 7d) or ISO 8601.")
]


def _db_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [MeshgateError, sqlite3.Error]
    with contextlib.suppress(ImportError):
        import psycopg

        errors.append(psycopg.Error)
    return tuple(errors)


def _holds_sqlite(path: Path) -> bool:
    """Whether opening `path` reads a database rather than creating one."""
    if not path.exists():
        return False
    wal = path.with_name(path.name + "-wal")
    return not path.is_file() or path.stat().st_size > 0 or wal.exists()


@contextlib.contextmanager
def _opened(store: str | None, state_dir: Path) -> Iterator[SqlAuditStore]:
    """Open the store for reading or pruning; a missing SQLite file is an error, not created
    (nor an empty one, which SQLite would happily fill with the audit tables)."""
    try:
        target = store_target(store, state_dir)
        parsed = parse_target(target)
        if parsed.kind == "sqlite" and not _holds_sqlite(Path(parsed.location)):
            raise ConfigError(
                f"no audit log at {parsed.location} (start the control plane, or pass --store)"
            )
        opened = open_store(target)
    except _db_errors() as exc:
        from_env = store is None and os.environ.get(STORE_ENV)  # not what the user typed
        raise fail(f"{f'${STORE_ENV}: ' if from_env else ''}{exc}") from None
    try:
        yield opened
    except _db_errors() as exc:
        raise fail(str(exc).strip()) from None
    finally:
        opened.close()


@audit_app.command()
def query(
    agent: Annotated[str | None, typer.Option(help="Only this agent.")] = None,
    destination: Annotated[str | None, typer.Option(help="Only this destination.")] = None,
    decision: Annotated[
        str | None, typer.Option(help=f"Only this decision: {', '.join(DECISIONS)}.")
    ] = None,
    tool: Annotated[
        str | None, typer.Option(help="Only MCP tools/call records naming this tool.")
    ] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many records (1..10000).")] = 100,
    cursor: Annotated[str | None, typer.Option(help="Continue after a previous page.")] = None,
    format: RecordsFormatOpt = Format.TABLE,
    wide: WideOpt = False,
    store: StoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    control_plane: AuditControlPlaneOpt = None,
    admin_token_file: AuditAdminTokenFileOpt = None,
) -> None:
    """Records matching every filter, newest first; prints the next page's --cursor on stderr."""
    try:
        q = build_query(
            agent=agent,
            destination=destination,
            decision=decision,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
            tool=tool,
        )
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if control_plane:
        page = _remote_page(control_plane, admin_token_file, state_dir, q)
    else:
        with _opened(store, state_dir) as opened:
            page = opened.query(q)
    print_records(page.records, format, wide=wide)
    if page.next_cursor:
        err_console.print(f"more: --cursor {page.next_cursor}", highlight=False, markup=False)


def _remote_page(base: str, token_file: Path | None, state_dir: Path, q: AuditQuery) -> AuditPage:
    params = {
        k: v
        for k, v in {
            "agent": q.agent,
            "destination": q.destination,
            "decision": q.decision,
            "tool": q.tool,
            "since": q.since.isoformat() if q.since else None,
            "until": q.until.isoformat() if q.until else None,
            "limit": str(q.limit),
            "cursor": q.cursor,
        }.items()
        if v is not None
    }
    client = admin.connect(base, token_file, state_dir)
    body = admin.get_ok(client, "/v1/audit", params, keys=("records", "next_cursor"))
    return AuditPage([AuditRecord.from_json(r) for r in body["records"]], body["next_cursor"])


def follow(
    store: SqlAuditStore,
    after_id: int,
    emit: Callable[[AuditRecord], None],
    interval: float = 0.5,
    keep_going: Callable[[], bool] = lambda: True,
) -> int:
    """Poll for records after `after_id` every `interval` s, oldest first; returns the last id."""
    while keep_going():
        batch = store.tail(after_id)
        for record_id, record in batch:
            emit(record)
            after_id = record_id
        if not batch:
            time.sleep(interval)
    return after_id


@audit_app.command()
def tail(
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records.")
    ] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many recent records.")] = 20,
    interval: Annotated[float, typer.Option(help="Seconds between polls with -f.")] = 0.5,
    format: LinesFormatOpt = Format.TEXT,
    store: StoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """The most recent records, oldest first; with -f, follow new ones until Ctrl-C."""
    if lines < 0:
        raise fail(f"--lines must be >= 0, got {lines}")

    def emit(record: AuditRecord) -> None:
        text = json_line(record.to_json(), compact=True) if format is Format.JSON else line(record)
        print(text, flush=True)

    with _opened(store, state_dir) as opened:
        last = opened.last_id()
        for _, record in opened.tail(max(0, last - lines), lines) if lines else []:
            emit(record)
        if follow_:
            with contextlib.suppress(KeyboardInterrupt):
                follow(opened, last, emit, interval)


@audit_app.command()
def summary(
    since: Annotated[str, typer.Option(help="From: a duration back (24h) or ISO 8601.")] = "24h",
    until: UntilOpt = None,
    format: RecordsFormatOpt = Format.TABLE,
    store: StoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    control_plane: AuditControlPlaneOpt = None,
    admin_token_file: AuditAdminTokenFileOpt = None,
    by: Annotated[
        str,
        typer.Option(
            help=f"Group by these, comma-separated: {', '.join(SUMMARY_KEYS)} "
            "(tool: MCP tools/call; model: LLM calls)."
        ),
    ] = ",".join(SUMMARY_DEFAULT),
) -> None:
    """Requests per agent x destination x decision (or --by other fields) over a time range,
    with the tokens and cost of the LLM calls among them."""
    keys = tuple(k.strip() for k in by.split(",") if k.strip())
    if not keys or any(k not in SUMMARY_KEYS for k in keys) or len(set(keys)) != len(keys):
        raise fail(f"--by {by!r}: give one or more of {', '.join(SUMMARY_KEYS)}, comma-separated")
    try:
        start = parse_instant(since, "--since")
        end = parse_instant(until, "--until") if until else None
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if end is not None and start >= end:
        raise fail("--since must be before --until")
    if control_plane:
        params = {"since": start.isoformat(), "by": ",".join(keys)}
        if end:
            params["until"] = end.isoformat()
        client = admin.connect(control_plane, admin_token_file, state_dir)
        body = admin.get_ok(client, "/v1/audit/summary", params, keys=("rows",))
        rows = [_summary_row(row) for row in body["rows"]]
    else:
        with _opened(store, state_dir) as opened:
            rows = opened.summary(start, end, keys)
    print_summary(rows, format, keys)


@audit_app.command()
def verify(
    format: TextOrJsonOpt = Format.TEXT,
    store: StoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Recompute the hash chain; exit 1 and say where, if any record or batch was altered."""
    with _opened(store, state_dir) as opened:
        report = opened.verify()
    if format is Format.JSON:
        print_json_line(report.to_json())
    elif report.ok:
        console.print(report_text(report), highlight=False, markup=False)
    else:
        err_console.print(report_text(report), highlight=False, markup=False)
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command()
def retain(
    retain_: Annotated[
        str | None, typer.Option("--retain", help="Keep this much history, e.g. 30d.")
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option(help="Delete records before this: a duration back (30d) or ISO 8601."),
    ] = None,
    store: StoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Delete whole old batches; what remains still verifies from the recorded anchor."""
    if (retain_ is None) == (older_than is None):
        raise fail("give exactly one of --retain DURATION or --older-than TIME")
    try:
        now = dt.datetime.now(dt.UTC)
        if retain_ is not None:  # keeping nothing (0s) is a typo, not a retention policy
            cutoff = now - parse_duration(retain_, "--retain", bare=False, positive=True)
        else:
            cutoff = parse_instant(str(older_than), "--older-than")
            if cutoff > now:  # `now` and `0s` are now: everything
                raise ConfigError(
                    f"--older-than {older_than}: in the future, it would delete records that "
                    "are not old yet (and every one of them)"
                )
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except OverflowError:
        raise fail(f"--retain: {retain_!r} reaches back before the year 1") from None
    with _opened(store, state_dir) as opened:
        result = opened.retain(cutoff)
    console.print(
        f"removed {result.records} records in {result.batches} batches older than "
        f"{cutoff.isoformat(timespec='seconds')}; the log now starts after batch "
        f"{result.anchor_seq}",
        highlight=False,
        markup=False,
    )


def _summary_row(data: dict[str, Any]) -> SummaryRow:
    """A row as the admin API sends it: the grouped fields only, the rest default."""
    return SummaryRow(**{"agent": "", "destination": "", "decision": "", **data})

"""`meshgate audit ...`: query, follow, summarise, verify and prune the audit log.

The store is found as `--store URL`, else $MESHGATE_AUDIT_STORE, else `<--state-dir>/audit.db`
(the control plane's default); `query` and `summary` can instead ask a running control plane's
admin API (`--control-plane URL`, with its operator token: `meshgate.adminclient`). Every expected
failure is one line on stderr and exit 1.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from meshgate.adminclient import AdminClient, AdminError, Unreachable, find_token
from meshgate.audit.chain import VerifyReport
from meshgate.audit.open import open_store, parse_target, store_target
from meshgate.audit.query import build_query, parse_duration, parse_instant
from meshgate.audit.record import AuditRecord
from meshgate.audit.sqlbase import SqlAuditStore
from meshgate.audit.store import AuditPage, AuditQuery, SummaryRow
from meshgate.errors import ConfigError, MeshgateError

audit_app = typer.Typer(
    help="The audit log: query, tail, summary, verify, retain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Audit store: a path, sqlite:///path or postgresql://...[?schema=s] "
        "(default: $MESHGATE_AUDIT_STORE, else <state-dir>/audit.db).",
    ),
]
StateOpt = Annotated[Path, typer.Option(help="Directory for local state (CA, audit, bootstraps).")]
FormatOpt = Annotated[str, typer.Option("--format", help="table, json (JSON lines) or csv")]
SinceOpt = Annotated[
    str | None, typer.Option(help="From this time: a duration back (1h, 7d) or ISO 8601.")
]
UntilOpt = Annotated[
    str | None, typer.Option(help="Before this time: a duration back (1h, 7d) or ISO 8601.")
]
ControlPlaneOpt = Annotated[
    str | None,
    typer.Option(
        help="Ask this control plane's admin API (e.g. http://127.0.0.1:18001) instead of "
        "opening the store."
    ),
]
AdminTokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="With --control-plane: file holding its admin token (default: "
        "$MESHGATE_ADMIN_TOKEN, else <state-dir>/admin/token)."
    ),
]
DEFAULT_STATE = Path(".meshgate")
RECORD_FIELDS = list(AuditRecord.__dataclass_fields__)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    return typer.Exit(1)


def _db_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [MeshgateError, sqlite3.Error]
    with contextlib.suppress(ImportError):
        import psycopg

        errors.append(psycopg.Error)
    return tuple(errors)


@contextlib.contextmanager
def _opened(store: str | None, state_dir: Path) -> Iterator[SqlAuditStore]:
    """Open the store for reading or pruning; a missing SQLite file is an error, not created."""
    try:
        target = store_target(store, state_dir)
        parsed = parse_target(target)
        if parsed.kind == "sqlite" and not Path(parsed.location).exists():
            raise ConfigError(
                f"no audit log at {parsed.location} (start the control plane, or pass --store)"
            )
        opened = open_store(target)
    except _db_errors() as exc:
        raise _fail(str(exc)) from None
    try:
        yield opened
    except _db_errors() as exc:
        raise _fail(str(exc).strip()) from None
    finally:
        opened.close()


def _check_format(format: str, allowed: Sequence[str]) -> None:
    if format not in allowed:
        raise _fail(f"--format must be one of {', '.join(allowed)}, got {format!r}")


def _print_records(records: Sequence[AuditRecord], format: str) -> None:
    if format == "json":
        for record in records:
            print(json.dumps(record.to_json(), separators=(",", ":")))
    elif format == "csv":
        writer = csv.DictWriter(sys.stdout, RECORD_FIELDS)
        writer.writeheader()
        writer.writerows(r.to_json() for r in records)
    else:
        table = Table(
            "time (UTC)", "agent", "destination", "request", "status", "decision", "reason"
        )
        for r in records:
            table.add_row(
                r.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
                r.agent,
                r.destination,
                f"{r.method} {r.host}{r.path}{_mcp(r)}",
                str(r.status),
                r.decision,
                r.reason,
            )
        console.print(table)


def _mcp(r: AuditRecord) -> str:
    """` [tools/call read_file]` for an MCP request, else nothing."""
    if not r.mcp_method:
        return ""
    return f" [{r.mcp_method}{' ' + r.mcp_tool if r.mcp_tool else ''}]"


def _line(record: AuditRecord) -> str:
    """One record per line, for tail: greppable."""
    r = record
    return (
        f"{r.timestamp.isoformat(timespec='milliseconds')} {r.agent} -> {r.destination} "
        f"{r.method} {r.host}{r.path}{_mcp(r)} {r.status} {r.decision}"
        + (f" ({r.reason})" if r.reason else "")
    )


@audit_app.command()
def query(
    agent: Annotated[str | None, typer.Option(help="Only this agent.")] = None,
    destination: Annotated[str | None, typer.Option(help="Only this destination.")] = None,
    decision: Annotated[
        str | None, typer.Option(help="allowed, denied, rate_limited or upstream_error.")
    ] = None,
    tool: Annotated[
        str | None, typer.Option(help="Only MCP tools/call records naming this tool.")
    ] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many records (1..10000).")] = 100,
    cursor: Annotated[str | None, typer.Option(help="Continue after a previous page.")] = None,
    format: FormatOpt = "table",
    store: StoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    control_plane: ControlPlaneOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
) -> None:
    """Records matching every filter, newest first; prints the next page's --cursor on stderr."""
    _check_format(format, ("table", "json", "csv"))
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
        raise _fail(str(exc)) from None
    if control_plane:
        page = _remote_page(_admin(control_plane, admin_token_file, state_dir), q)
    else:
        with _opened(store, state_dir) as opened:
            page = opened.query(q)
    _print_records(page.records, format)
    if page.next_cursor:
        err_console.print(f"more: --cursor {page.next_cursor}", highlight=False, markup=False)


def _admin(base: str, token_file: Path | None, state_dir: Path) -> AdminClient:
    try:
        return AdminClient(base, find_token(token_file, state_dir))
    except AdminError as exc:
        raise _fail(str(exc)) from None


def _remote_get(client: AdminClient, path: str, params: dict[str, str]) -> Any:
    """GET a control plane's admin API; its 400 message, a refused token or an unreachable host
    is one line."""
    try:
        answer = client.request("GET", path, params)
    except Unreachable as exc:
        raise _fail(f"cannot reach the control plane at {client.base}: {exc.reason}") from None
    except AdminError as exc:
        raise _fail(str(exc)) from None
    if answer.status >= 400:
        body = answer.body
        message = body.get("error") if isinstance(body, dict) else None
        raise _fail(f"{client.base}: {message or f'HTTP {answer.status}'}")
    return answer.body


def _remote_page(client: AdminClient, q: AuditQuery) -> AuditPage:
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
    body = _remote_get(client, "/v1/audit", params)
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
    format: Annotated[str, typer.Option("--format", help="text or json (JSON lines)")] = "text",
    store: StoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """The most recent records, oldest first; with -f, follow new ones until Ctrl-C."""
    _check_format(format, ("text", "json"))
    if lines < 0:
        raise _fail(f"--lines must be >= 0, got {lines}")

    def emit(record: AuditRecord) -> None:
        text = (
            json.dumps(record.to_json(), separators=(",", ":"))
            if format == "json"
            else (_line(record))
        )
        print(text, flush=True)

    with _opened(store, state_dir) as opened:
        last = opened.last_id()
        for _, record in opened.tail(max(0, last - lines), lines) if lines else []:
            emit(record)
        if follow_:
            with contextlib.suppress(KeyboardInterrupt):
                follow(opened, last, emit, interval)


def _print_summary(rows: Sequence[SummaryRow], format: str) -> None:
    if format == "json":
        print(json.dumps([r.__dict__ for r in rows]))
    elif format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["agent", "destination", "decision", "count"])
        writer.writerows([r.agent, r.destination, r.decision, r.count] for r in rows)
    else:
        table = Table("agent", "destination", "decision", "requests")
        for r in rows:
            table.add_row(r.agent, r.destination, r.decision, f"{r.count:,}")
        table.add_section()
        table.add_row("total", "", "", f"{sum(r.count for r in rows):,}")
        console.print(table)


@audit_app.command()
def summary(
    since: Annotated[str, typer.Option(help="From: a duration back (24h) or ISO 8601.")] = "24h",
    until: UntilOpt = None,
    format: FormatOpt = "table",
    store: StoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    control_plane: ControlPlaneOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
) -> None:
    """Requests per agent x destination x decision over a time range."""
    _check_format(format, ("table", "json", "csv"))
    try:
        start = parse_instant(since, "--since")
        end = parse_instant(until, "--until") if until else None
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if end is not None and start >= end:
        raise _fail("--since must be before --until")
    if control_plane:
        params = {"since": start.isoformat(), **({"until": end.isoformat()} if end else {})}
        client = _admin(control_plane, admin_token_file, state_dir)
        body = _remote_get(client, "/v1/audit/summary", params)
        rows = [SummaryRow(**row) for row in body["rows"]]
    else:
        with _opened(store, state_dir) as opened:
            rows = opened.summary(start, end)
    _print_summary(rows, format)


def report_text(report: VerifyReport) -> str:
    if report.ok:
        anchored = f", retained from batch {report.anchor_seq + 1}" if report.anchor_seq else ""
        return (
            f"audit log intact: {report.records} records in {report.batches} batches"
            f"{anchored} (head {report.head_seq}: {report.head_hash})"
        )
    lines = [
        f"audit log TAMPERED: {len(report.problems)} problem(s) in {report.records} "
        f"records, {report.batches} batches"
    ]
    lines += [f"  {p.kind}: {p.message}" for p in report.problems]
    if report.truncated:
        lines.append("  ... more problems not listed")
    return "\n".join(lines)


@audit_app.command()
def verify(
    format: Annotated[str, typer.Option("--format", help="text or json")] = "text",
    store: StoreOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Recompute the hash chain; exit 1 and say where, if any record or batch was altered."""
    _check_format(format, ("text", "json"))
    with _opened(store, state_dir) as opened:
        report = opened.verify()
    if format == "json":
        print(json.dumps(report.to_json()))
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
        raise _fail("give exactly one of --retain DURATION or --older-than TIME")
    try:
        if retain_ is not None:
            cutoff = dt.datetime.now(dt.UTC) - parse_duration(retain_, "--retain")
        else:
            cutoff = parse_instant(str(older_than), "--older-than")
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    with _opened(store, state_dir) as opened:
        result = opened.retain(cutoff)
    console.print(
        f"removed {result.records} records in {result.batches} batches older than "
        f"{cutoff.isoformat(timespec='seconds')}; the log now starts after batch "
        f"{result.anchor_seq}",
        highlight=False,
        markup=False,
    )

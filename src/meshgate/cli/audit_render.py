"""How `meshgate audit` shows records, summaries and verify reports in each output format."""

from __future__ import annotations

from collections.abc import Sequence

from meshgate.audit.chain import VerifyReport
from meshgate.audit.record import AuditRecord
from meshgate.audit.store import SummaryRow
from meshgate.cli.output import (
    Column,
    Format,
    Show,
    print_csv,
    print_json_line,
    print_table,
    short_times,
)
from meshgate.pacing.report import show_amount

RECORD_FIELDS = list(AuditRecord.__dataclass_fields__)

# who asked for what and what became of it always; the request line and status when they fit
RECORD_COLUMNS = (
    Column("time (UTC)"),
    Column("agent"),
    Column("spiffe id", Show.WIDE),
    Column("destination"),
    Column("request", Show.FIT),
    Column("status", Show.FIT, "right"),
    Column("decision"),
    Column("reason"),
    Column("sent", Show.WIDE, "right"),
    Column("received", Show.WIDE, "right"),
    Column("ms", Show.WIDE, "right"),
    Column("policy", Show.WIDE),
    Column("gateway", Show.WIDE),
    Column("request id", Show.WIDE),
)


def print_records(records: Sequence[AuditRecord], format: Format, *, wide: bool = False) -> None:
    if format is Format.JSON:
        for record in records:
            print_json_line(record.to_json(), compact=True)
    elif format is Format.CSV:
        print_csv(RECORD_FIELDS, (_csv_row(r.to_json()) for r in records))
    else:
        times = short_times([r.timestamp for r in records])
        print_table(
            RECORD_COLUMNS,
            (
                (
                    time,
                    r.agent,
                    r.spiffe_id,
                    r.destination,
                    f"{r.method} {r.host}{r.path}{_mcp(r)}",
                    str(r.status),
                    r.decision,
                    r.reason,
                    f"{r.bytes_sent:,}",
                    f"{r.bytes_received:,}",
                    f"{r.duration_ms:.1f}",
                    r.policy_version,
                    r.gateway,
                    r.request_id,
                )
                for time, r in zip(times, records, strict=True)
            ),
            wide=wide,
        )


def print_summary(
    rows: Sequence[SummaryRow],
    format: Format,
    by: Sequence[str] = ("agent", "destination", "decision"),
) -> None:
    """Counts per group; tokens and cost columns when any LLM call is among the rows."""
    usage = any(r.tokens_in or r.tokens_out or r.cost_micro_usd for r in rows)
    amounts = ("tokens_in", "tokens_out", "cost_micro_usd") if usage else ()
    if format is Format.JSON:
        print_json_line([r.to_json(tuple(by)) for r in rows])
    elif format is Format.CSV:
        print_csv(
            (*by, "count", *amounts),
            (
                (*(_group(r, k) for k in by), r.count, *(getattr(r, a) for a in amounts))
                for r in rows
            ),
        )
    else:
        right = [
            Column(name, justify="right") for name in ("requests", *_AMOUNT_NAMES[: len(amounts)])
        ]
        print_table(
            (*by, *right),
            (
                (
                    *(_group(r, k) or "-" for k in by),
                    f"{r.count:,}",
                    *(
                        (
                            f"{r.tokens_in:,}",
                            f"{r.tokens_out:,}",
                            show_amount("cost_micro_usd", r.cost_micro_usd),
                        )
                        if usage
                        else ()
                    ),
                )
                for r in rows
            ),
            footer=(
                "total",
                *([""] * (len(by) - 1)),
                f"{sum(r.count for r in rows):,}",
                *(
                    (
                        f"{sum(r.tokens_in for r in rows):,}",
                        f"{sum(r.tokens_out for r in rows):,}",
                        show_amount("cost_micro_usd", sum(r.cost_micro_usd for r in rows)),
                    )
                    if usage
                    else ()
                ),
            ),
        )


_AMOUNT_NAMES = ("tokens in", "tokens out", "cost")


def _group(row: SummaryRow, key: str) -> str:
    return str(getattr(row, key))


def _csv_row(fields: dict[str, object]) -> list[object]:
    return [fields[name] for name in RECORD_FIELDS]


def _mcp(r: AuditRecord) -> str:
    """` [tools/call read_file]` for an MCP request, else nothing."""
    if not r.mcp_method:
        return ""
    return f" [{r.mcp_method}{' ' + r.mcp_tool if r.mcp_tool else ''}]"


def line(record: AuditRecord) -> str:
    """One record per line, for tail: greppable, a field per word (`-` when empty, as for a
    CONNECT to an unknown destination), so `awk '{print $4}'` is always the destination."""
    r = record
    return (
        f"{r.timestamp.isoformat(timespec='milliseconds')} {r.agent or '-'} -> "
        f"{r.destination or '-'} "
        f"{r.method} {r.host}{r.path}{_mcp(r)} {r.status} {r.decision}"
        + (f" ({r.reason})" if r.reason else "")
    )


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

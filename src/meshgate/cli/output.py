"""Output formats from one place: the `Format` every `--format` takes, and how each renders.

A command lists the formats it offers with `format_option`; a value it does not offer is one
line on stderr and exit 1, like every other expected failure, never a usage box.

Tables fit the terminal (or 80 columns, or $COLUMNS, in a pipe): the columns a reader needs
(`Show.KEY`) are always there and fold long values onto more lines rather than cutting them;
the rest appear when they fit whole, and `--wide` shows every column at full width.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Literal

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class Format(StrEnum):
    TEXT = "text"
    TABLE = "table"
    JSON = "json"
    CSV = "csv"
    TOKEN = "token"
    K8S_SECRET = "k8s-secret"


@dataclass(frozen=True)
class FormatChoice:
    """Typer's parser for one command's `--format`: its value as a `Format` it offers."""

    formats: tuple[Format, ...]

    def __call__(self, value: str | Format) -> Format:
        if value in self.formats:
            return Format(value)
        choices = ", ".join(self.formats)
        err_console.print(
            f"[red]error:[/red] --format must be one of {choices}, got {value!r}",
            highlight=False,
        )
        raise typer.Exit(1)


def format_option(*formats: Format, help: str) -> Any:
    """The `--format` option offering `formats` (its default is the command's to choose)."""
    return typer.Option(
        "--format",
        "-o",
        parser=FormatChoice(formats),
        metavar=f"<{'|'.join(formats)}>",
        help=help,
    )


def print_json(data: Any) -> None:
    """Indented and coloured on a terminal, for people."""
    console.print_json(data=data)


def json_line(data: Any, *, compact: bool = False) -> str:
    """One JSON document on one line, for scripts (JSON lines when one per record)."""
    return json.dumps(data, separators=(",", ":") if compact else None)


def print_json_line(data: Any, *, compact: bool = False) -> None:
    print(json_line(data, compact=compact))


def print_csv(fields: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    writer = csv.writer(sys.stdout)
    writer.writerow(fields)
    writer.writerows(rows)


PIPE_WIDTH = 80  # a table's width when stdout is not a terminal and $COLUMNS is unset
MIN_WIDTH = 20
KEY_MIN = 24  # cells a key column keeps (if it needs them) before optional columns get any
NATURAL = 1_000_000  # "unlimited" width, for measuring a table's unwrapped size


def output_width() -> int:
    """$COLUMNS when set, else the terminal's width, else 80: rich's own guess in a pipe can be
    another stream's terminal, or a squeeze that cuts every column to a few characters."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return max(MIN_WIDTH, int(columns))
    stream = sys.stdout
    try:
        if stream.isatty():
            return max(MIN_WIDTH, os.get_terminal_size(stream.fileno()).columns)
    except (OSError, ValueError, AttributeError):
        pass
    return PIPE_WIDTH


def fitted_console(width: int | None = None) -> Console:
    """A stdout console that wraps at `width` (default `output_width()`), looked up per call
    so a pipe, $COLUMNS or a test's captured stdout are what count."""
    return Console(width=width or output_width(), soft_wrap=False, highlight=False)


class Show(Enum):
    """When a table column appears."""

    KEY = "key"  # always; long values fold onto more lines, never cut
    FIT = "fit"  # by default when the table still fits unwrapped; always with --wide
    WIDE = "wide"  # only with --wide
    NARROW = "narrow"  # only without --wide: a compact stand-in for some WIDE columns


@dataclass(frozen=True)
class Column:
    header: str
    show: Show = Show.KEY
    justify: Literal["left", "right"] = "left"


def print_table(
    columns: Sequence[str | Column],
    rows: Iterable[Sequence[str | Text]],
    *,
    footer: Sequence[str] | None = None,
    wide: bool = False,
) -> None:
    """A rich table that fits `output_width()` (or, `wide`, every column at full width);
    `footer` is a last row under a rule (a total). Plain strings are shown as they are, never
    read as rich markup."""
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    body = [[_text(cell) for cell in row] for row in rows]
    foot = [_text(cell) for cell in footer] if footer is not None else None
    width = output_width()
    if wide:
        chosen = [i for i, c in enumerate(cols) if c.show is not Show.NARROW]
        table = _table(cols, chosen, body, foot)
        fitted_console(max(width, _natural_width(table))).print(table)
        return
    chosen = [i for i, c in enumerate(cols) if c.show in (Show.KEY, Show.NARROW)]
    natural = [_column_width(i, c, body, foot) for i, c in enumerate(cols)]
    # a key column keeps at least KEY_MIN cells (or all it needs); the rest appear whole in
    # what is left (3 cells a column for its padding and rule, 1 for the table's edge)
    used = 1 + sum(min(natural[i], KEY_MIN) + 3 for i in chosen)
    for i, c in enumerate(cols):
        if c.show is Show.FIT and used + natural[i] + 3 <= width:
            chosen.append(i)
            used += natural[i] + 3
    fitted_console(width).print(_table(cols, sorted(chosen), body, foot))


def _text(cell: str | Text) -> Text:
    return cell if isinstance(cell, Text) else Text(cell)


def _table(
    cols: Sequence[Column], chosen: Sequence[int], body: list[list[Text]], foot: list[Text] | None
) -> Table:
    table = Table()
    for i in chosen:
        table.add_column(cols[i].header, justify=cols[i].justify, overflow="fold")
    for row in body:
        table.add_row(*(row[i] for i in chosen))
    if foot is not None:
        table.add_section()
        table.add_row(*(foot[i] for i in chosen))
    return table


def _column_width(i: int, column: Column, body: list[list[Text]], foot: list[Text] | None) -> int:
    """Cells the widest line of column `i` (header included) takes unwrapped."""
    cells = [column.header, *(row[i].plain for row in body), *([foot[i].plain] if foot else [])]
    return max(cell_len(line) for cell in cells for line in cell.split("\n"))


def _natural_width(table: Table) -> int:
    console = Console(width=NATURAL)
    return table.__rich_measure__(console, console.options).maximum


def short_times(times: Sequence[dt.datetime], now: dt.datetime | None = None) -> list[str]:
    """UTC HH:MM:SS when every time is today (UTC), else date and time."""
    now = now or dt.datetime.now(dt.UTC)
    utc = [t.astimezone(dt.UTC) for t in times]
    today = all(t.date() == now.date() for t in utc)
    return [t.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S") for t in utc]

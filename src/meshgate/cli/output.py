"""Output formats from one place: the `Format` every `--format` takes, and how each renders.

A command lists the formats it offers with `format_option`; a value it does not offer is one
line on stderr and exit 1, like every other expected failure, never a usage box.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import typer
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


def print_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[str | Text]],
    *,
    footer: Sequence[str] | None = None,
) -> None:
    """A rich table; `footer` is a last row under a rule (a total)."""
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    if footer is not None:
        table.add_section()
        table.add_row(*footer)
    console.print(table)

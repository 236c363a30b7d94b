"""`meshgate budget status`: what each budget has spent and holds reserved, against its limit."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from meshgate.cli import admin
from meshgate.cli.options import (
    DEFAULT_ADMIN,
    DEFAULT_STATE,
    AdminOpt,
    AdminTokenFileOpt,
    StateOpt,
    TableOrJsonOpt,
    WideOpt,
)
from meshgate.cli.output import Column, Format, Show, console, print_json, print_table
from meshgate.pacing.report import show_amount

budget_app = typer.Typer(help="Budgets: spend, reservations and limits.", no_args_is_help=True)

BUDGET_COLUMNS = (
    Column("budget"),
    Column("scope", Show.WIDE),
    Column("agents", Show.WIDE),
    Column("window", Show.FIT),
    Column("spent", justify="right"),
    Column("reserved", Show.FIT, "right"),
    Column("limit", justify="right"),
    Column("left", justify="right"),
    Column("resets"),
    Column("resets at (UTC)", Show.WIDE),
    Column("on store failure", Show.WIDE),
)
UNIT_NAMES = {
    "requests": "requests",
    "tokens": "tokens",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
    "cost_micro_usd": "USD",
}


@budget_app.command("status")
def budget_status(
    agent: Annotated[
        str | None, typer.Option(help="Only the budgets that count this agent's requests.")
    ] = None,
    admin_url: AdminOpt = DEFAULT_ADMIN,
    format: TableOrJsonOpt = Format.TABLE,
    wide: WideOpt = False,
    admin_token_file: AdminTokenFileOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Spent (settled, plus expired reservations), reserved (requests in flight) and the limit
    of every budget in the current window, and when the window resets."""
    client = admin.connect(admin_url, admin_token_file, state_dir, timeout=10)
    params = {"agent": agent} if agent else None
    answer = admin.call(client, "GET", "/v1/budgets", params=params, where=admin_url)
    data = admin.fields(answer, f"{admin_url.rstrip('/')}/v1/budgets", ("now", "budgets"))
    if format is Format.JSON:
        print_json(data)
        return
    if not data["budgets"]:
        who = f"agent {agent!r}" if agent else "any agent"
        console.print(f"no budget applies to {who}", highlight=False)
        return
    now = dt.datetime.fromtimestamp(data["now"], dt.UTC)
    rows = []
    for b in data["budgets"]:
        unit = b["unit"]
        resets = dt.datetime.fromtimestamp(b["resets_at"], dt.UTC)
        rows.append(
            (
                b["budget"],
                str(b.get("scope", "")),
                ", ".join(b.get("agents", ())),
                b["window"],
                show_amount(unit, b["spent"]),
                show_amount(unit, b["reserved"]),
                f"{show_amount(unit, b['limit'])} {UNIT_NAMES.get(unit, unit)}",
                f"{_left(b)}%",
                f"in {_until(resets - now)}",
                resets.strftime("%Y-%m-%d %H:%M:%S"),
                str(b.get("on_store_failure", "")),
            )
        )
    print_table(BUDGET_COLUMNS, rows, wide=wide)


def _left(b: dict[str, int]) -> int:
    return max(0, (b["limit"] - b["spent"] - b["reserved"]) * 100 // b["limit"])


def _until(delta: dt.timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes}m" if hours else f"{minutes}m"

"""`budget status` rows: every budget the policy defines, joined with the store's counters."""

from __future__ import annotations

import datetime as dt

from builders import model

from meshgate.pacing.report import budget_rows, show_amount
from meshgate.pacing.spec import window_bounds
from meshgate.pacing.store import BudgetState
from meshgate.policy.model import AgentPolicy, Budget, EgressRule, GroupBudget

NOW = dt.datetime(2026, 12, 1, 10, 30, tzinfo=dt.UTC).timestamp()
SPEND = Budget("spend", "cost_micro_usd", 5_000_000, "month")


def policy() -> object:
    team = GroupBudget("team", SPEND)
    coder = AgentPolicy(
        "coder",
        "coder",
        (EgressRule("alpha", budgets=(Budget("hourly", "requests", 100, "hour"),)),),
        budgets=(Budget("daily", "tokens", 10_000, "day"),),
        group_budgets=(team,),
    )
    writer = AgentPolicy("writer", "writer", (EgressRule("alpha"),), group_budgets=(team,))
    return model(agents=(coder, writer))


def test_rows_list_every_budget_and_join_the_current_window_only() -> None:
    day_start, day_end = window_bounds("day", NOW)
    month_start, _ = window_bounds("month", NOW)
    states = [
        BudgetState("agent/coder/daily", day_start, day_end, 10_000, 2_500, 400),
        BudgetState("agent/coder/daily", day_start - 86_400, day_start, 10_000, 9_999, 0),
        BudgetState("group/team/spend", month_start, 0, 5_000_000, 1_250_000, 0),
    ]
    rows = budget_rows(policy(), states, NOW)  # type: ignore[arg-type]
    by_id = {r.budget: r for r in rows}
    assert list(by_id) == ["agent/coder/daily", "rule/coder/0/hourly", "group/team/spend"]
    daily = by_id["agent/coder/daily"]
    assert (daily.spent, daily.reserved, daily.remaining, daily.resets_at) == (
        2_500,
        400,
        7_100,
        day_end,
    )
    assert by_id["rule/coder/0/hourly"].spent == 0  # nothing spent yet: listed all the same
    assert by_id["group/team/spend"].agents == ("coder", "writer")
    writer = budget_rows(policy(), states, NOW, agent="writer")  # type: ignore[arg-type]
    assert [r.budget for r in writer] == ["group/team/spend"]


def test_amounts_read_as_money_or_counts() -> None:
    assert show_amount("cost_micro_usd", 25_000_000) == "$25.00"
    assert show_amount("cost_micro_usd", 1_234_567) == "$1.234567"
    assert show_amount("cost_micro_usd", 1_500_000) == "$1.50"
    assert show_amount("tokens", 12_000) == "12,000"

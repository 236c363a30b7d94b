"""Budgets as operators read them: every budget the policy defines, joined with its counters.

Pure. A budget nobody has spent from yet has no counter in the store; it is still listed (spent
0), so `meshgate budget status` shows the limits that apply, not only the ones in use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from meshgate.pacing.spec import window_bounds
from meshgate.pacing.store import BudgetState
from meshgate.policy.model import Budget, PolicyModel


@dataclass(frozen=True)
class BudgetRow:
    budget: str  # the counter's id (pacing.spec.BudgetSpec.id)
    scope: str  # "agent coder", "group team", "rule 1 of coder (openai)"
    agents: tuple[str, ...]  # whose requests it counts
    unit: str
    window: str
    limit: int
    spent: int
    reserved: int
    resets_at: int  # epoch seconds: the end of the current window
    on_store_failure: str

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.spent - self.reserved)

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "scope": self.scope,
            "agents": list(self.agents),
            "unit": self.unit,
            "window": self.window,
            "limit": self.limit,
            "spent": self.spent,
            "reserved": self.reserved,
            "remaining": self.remaining,
            "resets_at": self.resets_at,
            "on_store_failure": self.on_store_failure,
        }


def _defined(model: PolicyModel) -> Iterable[tuple[str, str, tuple[str, ...], Budget]]:
    members: dict[tuple[str, str], list[str]] = {}
    group_budgets: dict[tuple[str, str], Budget] = {}
    for policy in model.agents:
        agent = policy.agent
        for b in policy.budgets:
            yield f"agent/{agent}/{b.name}", f"agent {agent}", (agent,), b
        for index, rule in enumerate(policy.rules):
            if rule.counters is not None:  # a sub-agent's: its parent's counter, listed there
                continue
            for b in rule.budgets if rule.enforced else ():
                scope = f"rule {index} of {agent} ({rule.destination})"
                yield f"rule/{agent}/{index}/{b.name}", scope, (agent,), b
        for g in policy.group_budgets:
            key = (g.group, g.budget.name)
            members.setdefault(key, []).append(agent)
            group_budgets[key] = g.budget
    for (group, name), b in sorted(group_budgets.items()):
        yield f"group/{group}/{name}", f"group {group}", tuple(members[(group, name)]), b


def budget_rows(
    model: PolicyModel, states: Sequence[BudgetState], now: float, agent: str | None = None
) -> list[BudgetRow]:
    """Every budget that applies to `agent` (all agents when None), with the current window's
    spent and reserved amounts."""
    current = {(s.budget, s.window_start): s for s in states}
    rows = []
    for budget_id, scope, agents, b in _defined(model):
        if agent is not None and agent not in agents:
            continue
        start, end = window_bounds(b.window, now)
        state = current.get((budget_id, start))
        rows.append(
            BudgetRow(
                budget_id,
                scope,
                agents,
                b.unit,
                b.window,
                b.limit,
                state.spent if state else 0,
                state.reserved if state else 0,
                end,
                b.on_store_failure,
            )
        )
    return rows


def show_amount(unit: str, amount: int) -> str:
    """`$1.234567` for money (micro-dollars), `12,000` for counts."""
    if unit == "cost_micro_usd":
        dollars, micros = divmod(amount, 1_000_000)
        cents = f"{micros:06d}".rstrip("0").ljust(2, "0")
        return f"${dollars:,}.{cents}"
    return f"{amount:,}"

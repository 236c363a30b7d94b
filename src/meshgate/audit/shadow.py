"""Shadow mode: what the policy's shadow rules would have decided, for every ingested request of
an agent they concern.

Evaluated where every request of every gateway replica arrives, the audit ingest, after the
gateway decided: so a shadow rule can never change what happens to a request. The route
decision comes from the gateway's own route table for `policy.model.shadow_model` (the code
the replay uses: `replay.routes`, the bytes gateways get over RDS); rate limits and budgets of
the matched rule count in counters of their own, here, never in the live ones (a shadow bucket
or budget that would refuse is a would-be `rate_limited` or `over_budget`).

Tool argument rules are evaluated by the gateway's pacer, which reads the call (on routes it
already paces: the agent has tool rules, budgets or caps there), and arrive as the record's
pacer-set `shadow_refused`. Not evaluated: argument rules where the pacer does not read the
call, `headers:` conditions (`undecided`), concurrency caps, model and max_tokens rules.
Shadow counters live in this control plane's memory: with several control plane replicas each
counts the records it ingests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshgate.audit.chain import values_digest
from meshgate.audit.sqlbase import FIELDS
from meshgate.pacing.spec import BudgetSpec, window_bounds
from meshgate.policy.model import (
    AgentPolicy,
    PolicyModel,
    has_shadow,
    shadow_model,
    shadowed_agents,
)
from meshgate.replay.routes import PolicyRoutes, Request
from meshgate.xds.pacing import budget_specs

log = logging.getLogger(__name__)


def _at(field: str) -> int:
    """A field's position in `chain.record_values` (the timestamp is first)."""
    return 1 + FIELDS.index(field)


TS = 0
AGENT, SPIFFE, HOST, METHOD = _at("agent"), _at("spiffe_id"), _at("host"), _at("method")
PATH, DECISION, RECEIVED, NODE = _at("path"), _at("decision"), _at("bytes_received"), _at("gateway")
MCP_METHOD, MCP_TOOL = _at("mcp_method"), _at("mcp_tool")
TOKENS_IN, TOKENS_OUT, COST = _at("tokens_in"), _at("tokens_out"), _at("cost_micro_usd")
SHADOW = _at("shadow_decision")
REFUSED = frozenset({"denied", "rate_limited", "over_budget", "queue_timeout"})
MAX_COUNTERS = 100_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class ShadowCounters:
    """Shadow rate-limit buckets and budget windows; kept across policy versions (a counter
    means the same rule or budget while its key does)."""

    def __init__(self) -> None:
        self.buckets: dict[str, _Bucket] = {}
        self.spent: dict[tuple[str, int], int] = {}

    def take(self, key: str, requests: int, per_seconds: int, now: float) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= MAX_COUNTERS:
                self.buckets.clear()  # a bound, not a policy: shadow counts restart
            bucket = self.buckets[key] = _Bucket(float(requests), now)
        bucket.tokens = min(
            float(requests), bucket.tokens + max(0.0, now - bucket.at) * requests / per_seconds
        )
        bucket.at = max(bucket.at, now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        return False

    def charge(self, wanted: list[tuple[BudgetSpec, int]], now: float) -> str | None:
        """All or nothing, as a reservation: the first budget that would go over, or None."""
        windows = []
        for b, amount in wanted:
            start, _ = window_bounds(b.window, now)
            key = (b.id, start)
            if self.spent.get(key, 0) + amount > b.limit:
                return b.id
            windows.append((key, amount))
        if len(self.spent) >= MAX_COUNTERS:
            self.spent.clear()
        for key, amount in windows:
            self.spent[key] = self.spent.get(key, 0) + amount
        return None


def _amount(b: BudgetSpec, values: tuple[Any, ...]) -> int:
    if b.unit == "requests":
        return 1
    if b.unit == "tokens":
        return int(values[TOKENS_IN]) + int(values[TOKENS_OUT])
    if b.unit == "input_tokens":
        return int(values[TOKENS_IN])
    if b.unit == "output_tokens":
        return int(values[TOKENS_OUT])
    return int(values[COST])


class ShadowEvaluator:
    """The would-be decisions of one policy version."""

    def __init__(self, model: PolicyModel, counters: ShadowCounters) -> None:
        self.model = model
        self.agents = shadowed_agents(model)
        shadowed = shadow_model(model)
        self._policies: dict[str, AgentPolicy] = {a.agent: a for a in shadowed.agents}
        self._destinations = {d.name: d for d in shadowed.destinations}
        self._routes = PolicyRoutes(shadowed)
        self._counters = counters

    def prepare(self) -> None:
        """Build both route tables now (blocking: run off the event loop)."""
        self._routes.table(True)
        self._routes.table(False)

    def decide(self, values: tuple[Any, ...]) -> tuple[str, str] | None:
        """(decision, reason) for a record of a shadowed agent logged by a gateway, else None."""
        agent = values[AGENT]
        if agent not in self.agents or not str(values[NODE]).startswith("gateway/"):
            return None
        request = Request(
            values[SPIFFE] or agent,
            values[HOST],
            values[METHOD],
            values[PATH],
            values[MCP_METHOD],
            values[MCP_TOOL],
            int(values[RECEIVED]) > 0,
        )
        verdict = self._routes.evaluate(request)
        if verdict.undecided:
            return "undecided", "headers not recorded: " + ",".join(verdict.unknown_headers)
        route = verdict.decision
        if route.decision != "allowed":
            return route.decision, route.reason
        if values[SHADOW] == "denied":  # the pacer read the call: its shadow tool rules refuse
            return "denied", str(values[SHADOW + 1])
        return self._paced(agent, verdict.routes[0], values)

    def _paced(self, agent: str, route_name: str, values: tuple[Any, ...]) -> tuple[str, str]:
        policy = self._policies.get(agent)
        parts = route_name.split("/")  # allow/<agent>/<destination>/<rule index>/<n>
        dest = self._destinations.get(parts[2]) if len(parts) >= 4 else None
        if policy is None or dest is None or not parts[3].isdigit():
            return "allowed", ""
        index = int(parts[3])
        if index >= len(policy.rules):
            return "allowed", ""
        rule = policy.rules[index]
        now = int(values[TS]) / 1e6
        limit = rule.rate_limit
        if limit is not None:
            key = f"{agent}/{parts[2]}/{index}"
            if not self._counters.take(key, limit.requests, limit.per_seconds, now):
                return "rate_limited", "rate_limited"
        wanted = [(b, _amount(b, values)) for b in budget_specs(policy, index, rule, dest)]
        refused = self._counters.charge(wanted, now) if wanted else None
        if refused is not None:
            return "over_budget", f"over_budget: {refused}"
        return "allowed", ""


def change(live: str, shadow: str) -> str:
    """How the would-be decision differs from what the gateway did."""
    if shadow == "undecided":
        return "undecided"
    was, would = live in REFUSED, shadow in REFUSED
    if was == would:
        return "same"
    return "newly_refused" if would else "newly_allowed"


class ShadowDecisions:
    """Annotates ingested records with would-be decisions (on the ingest thread), following
    the policy the control plane serves (`current_model`, read per batch)."""

    def __init__(
        self,
        current_model: Callable[[], PolicyModel | None],
        on_decision: Callable[[str, str], None] | None = None,
    ) -> None:
        self._current = current_model
        self._on_decision = on_decision  # (shadow decision, change): metrics
        self._counters = ShadowCounters()
        self._evaluator: ShadowEvaluator | None = None
        self._model: PolicyModel | None = None

    async def _evaluator_now(self) -> ShadowEvaluator | None:
        model = self._current()
        if model is not self._model:
            self._model = model
            # the whole policy is walked (and route tables built): not on the ingest loop
            self._evaluator = None if model is None else await asyncio.to_thread(self._build, model)
        return self._evaluator

    def _build(self, model: PolicyModel) -> ShadowEvaluator | None:
        if not has_shadow(model):
            return None
        evaluator = ShadowEvaluator(model, self._counters)
        evaluator.prepare()
        return evaluator

    async def annotate(self, values: list[tuple[Any, ...]], digests: list[bytes]) -> None:
        """Set the shadow fields of the records it concerns (and their digests), in place."""
        evaluator = await self._evaluator_now()
        if evaluator is None:
            return
        for i, v in enumerate(values):
            try:
                decided = evaluator.decide(v)
            except Exception:  # a shadow evaluation must never lose or delay a record
                log.exception("shadow evaluation failed for %s", v[1])
                decided = ("undecided", "shadow evaluation failed")
            if decided is None:
                continue
            annotated = (*v[:SHADOW], decided[0], decided[1][:256], *v[SHADOW + 2 :])
            values[i] = annotated
            digests[i] = values_digest(annotated)
            if self._on_decision is not None:
                self._on_decision(decided[0], change(v[DECISION], decided[0]))

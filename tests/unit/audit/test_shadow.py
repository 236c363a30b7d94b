"""Would-be decisions of shadow rules, set on ingested records: route decisions from the shadow
policy's own gateway route table, limits and budgets on counters of their own."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from meshgate.audit.chain import encode_values, record_values, values_digest
from meshgate.audit.record import AuditRecord
from meshgate.audit.shadow import ShadowDecisions, change
from meshgate.policy.loader import load_policy_texts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "policy"))
from policy_texts import HEAD, agent, base

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
HOST = "search.tools.example:443"


def values(
    path: str,
    method: str = "GET",
    decision: str = "allowed",
    at: float = 0.0,
    who: str = "coder",
    node: str = "gateway/egress",
) -> tuple[Any, ...]:
    return record_values(
        AuditRecord(
            T0 + dt.timedelta(seconds=at),
            f"r{at}{path}{method}",
            who,
            "",
            "search-api",
            HOST,
            method,
            path,
            200,
            decision,  # type: ignore[arg-type]
            "",
            0,
            0,
            1.0,
            "v1",
            node,
        )
    )


def model_with(rules: str, shadow: str = "") -> Any:
    files = base(coder=agent("coder", rules))
    if shadow:
        files["p/next.yaml"] = (
            f"{HEAD}kind: AgentPolicy\nmetadata: {{name: coder-next}}\nspec:\n  agent: coder\n"
            f"  mode: shadow\n  egress:\n{shadow}"
        )
    return load_policy_texts(files)


def annotate(model: Any, records: list[tuple[Any, ...]]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    shadow = ShadowDecisions(lambda: model, lambda d, c: seen.append((d, c)))
    digests = [values_digest(v) for v in records]
    asyncio.run(shadow.annotate(records, digests))
    assert digests == [values_digest(v) for v in records]  # re-signed with the new fields
    assert all(len(v) == 26 for v in records)  # later fields kept in place
    return [(v[23], v[24]) for v in records]


def test_a_narrower_shadow_policy_would_refuse_what_is_allowed_today() -> None:
    model = model_with(
        "    - destination: search-api\n",
        shadow="    - destination: search-api\n      paths: [/v2/*]\n",
    )
    got = annotate(model, [values("/v2/q"), values("/v1/q")])
    assert got[0] == ("allowed", "")
    assert got[1][0] == "denied" and got[1][1] == "egress_denied"


def test_a_shadow_rule_would_allow_what_is_refused_today() -> None:
    rules = "    - destination: search-api\n      methods: [GET]\n"
    shadow_rule = "    - destination: search-api\n      methods: [POST]\n      mode: shadow\n"
    model = model_with(rules + shadow_rule)
    assert annotate(model, [values("/q", "POST", decision="denied")]) == [("allowed", "")]
    assert change("denied", "allowed") == "newly_allowed"


def test_shadow_limits_and_budgets_count_on_their_own() -> None:
    shadow = (
        "    - destination: search-api\n"
        "      rateLimit: {requests: 2, per: 1m}\n"
        "      budgets: [{name: daily, window: day, requests: 3}]\n"
    )
    model = model_with("    - destination: search-api\n", shadow=shadow)
    # 2 a minute: the third within the minute is limited; later ones refill, until the
    # budget (3 counted: refused ones are not charged) says no
    got = annotate(model, [values("/q", at=t) for t in (0, 1, 2, 40, 70)])
    assert [d for d, _ in got] == ["allowed", "allowed", "rate_limited", "allowed", "over_budget"]
    assert got[4][1] == "over_budget: rule/coder/0/daily"


def test_records_it_does_not_concern_are_left_alone() -> None:
    model = model_with("    - destination: search-api\n", shadow="    - destination: search-api\n")
    other = values("/q", who="reviewer")
    by_sidecar = values("/q", node="agent/coder")
    assert annotate(model, [other, by_sidecar]) == [("", ""), ("", "")]
    plain = model_with("    - destination: search-api\n")
    assert annotate(plain, [values("/q")]) == [("", "")]


def test_records_without_a_shadow_decision_encode_as_before_it_existed() -> None:
    v = values("/q")
    assert v[23:25] == ("", "")
    assert encode_values(v) == encode_values(v[:23])  # chains stored earlier still verify
    assert encode_values((*v[:23], "denied", "egress_denied", *v[25:])) != encode_values(v[:23])


def test_a_tool_the_pacer_says_shadow_rules_refuse_is_a_would_be_refusal() -> None:
    model = model_with("    - destination: search-api\n", shadow="    - destination: search-api\n")
    read = (*values("/q")[:23], "denied", "argument_refused: repo", "")
    routed_away = (*values("/q", method="DELETE")[:23], "denied", "argument_refused: x", "")
    assert annotate(model, [read]) == [("denied", "argument_refused: repo")]
    # the route table decides first: a would-be route refusal is not masked by the pacer's
    narrow = model_with(
        "    - destination: search-api\n",
        shadow="    - destination: search-api\n      methods: [GET]\n",
    )
    assert annotate(narrow, [routed_away])[0][1] == "egress_denied"

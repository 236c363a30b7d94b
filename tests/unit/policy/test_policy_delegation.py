"""The `delegation` field of an AgentPolicy: compiled, and its errors at file:line:col."""

from __future__ import annotations

import pytest
from policy_texts import HEAD, R, base, problems

from meshgate.policy.loader import load_policy_texts
from meshgate.policy.model import Delegation


def supervisor(delegation: str) -> str:
    return (
        f"{HEAD}kind: AgentPolicy\nmetadata: {{name: sup}}\nspec:\n  agent: sup\n"
        f"  delegation: {delegation}\n  egress:\n{R}"
    )


def test_delegation_compiles() -> None:
    model = load_policy_texts(base(a=supervisor("{maxSubAgents: 5, maxTtl: 2h}")))
    sup = model.agent("sup")
    assert sup is not None and sup.delegation == Delegation(5, 7200)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "{maxSubAgents: 0, maxTtl: 1h}",
            "p/a.yaml:6:30: delegation.maxSubAgents 0: must be between 1 and 1000",
        ),
        (
            "{maxSubAgents: 1, maxTtl: 31d}",
            'p/a.yaml:6:41: delegation.maxTtl "31d": must be a duration such as 15m, 1h or 7d, '
            "at most 30d",
        ),
        ("{maxSubAgents: 1}", 'p/a.yaml:6:3: missing required field "maxTtl" in delegation'),
        (
            "{maxSubAgents: 1, maxTtl: 1h, depth: 2}",
            'p/a.yaml:6:45: unknown field "depth" in delegation',
        ),
    ],
)
def test_delegation_errors_point_at_the_field(text: str, message: str) -> None:
    found = problems(base(a=supervisor(text)))
    assert found == [message]

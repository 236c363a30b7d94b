"""`mode: shadow` on a rule, an AgentGroup or a whole AgentPolicy: compiled beside the enforced
policy, never translated into what gateways enforce."""

from __future__ import annotations

from policy_texts import HEAD, agent, base, problems

from meshgate.policy.loader import load_policy_texts
from meshgate.policy.model import has_shadow, shadow_model, shadowed_agents
from meshgate.policy.plan import diff_policies, render_plan_text
from meshgate.xds.gateway import egress_routes

LIVE = "    - destination: search-api\n      methods: [GET]\n"
SHADOW_RULE = "    - destination: search-api\n      methods: [POST]\n      mode: shadow\n"


def shadow_policy(rules: str, name: str = "coder-next") -> str:
    return (
        f"{HEAD}kind: AgentPolicy\nmetadata: {{name: {name}}}\nspec:\n  agent: coder\n"
        f"  mode: shadow\n  egress:\n{rules}"
    )


def routes_of(model: object) -> list[str]:
    table = egress_routes(model, {})  # type: ignore[arg-type]
    return [r.name for vh in table.virtual_hosts for r in vh.routes if "/coder/" in r.name]


def test_a_shadow_rule_is_in_the_model_but_never_routed() -> None:
    model = load_policy_texts(base(coder=agent("coder", SHADOW_RULE + LIVE)))
    rules = model.agent("coder").rules  # type: ignore[union-attr]
    assert [r.mode for r in rules] == ["shadow", "enforce"]
    assert has_shadow(model) and shadowed_agents(model) == {"coder"}
    # the enforced rule keeps its index (1): its routes and counters do not move
    assert routes_of(model) == ["allow/coder/search-api/1/0"]
    shadowed = shadow_model(model)
    assert not has_shadow(shadowed)
    assert routes_of(shadowed) == ["allow/coder/search-api/0/0", "allow/coder/search-api/1/0"]


def test_a_shadow_agent_policy_replaces_the_agents_own_rules_in_shadow_only() -> None:
    texts = base(
        coder=agent("coder", LIVE),
        next=shadow_policy("    - destination: search-api\n      paths: [/v2/*]\n"),
    )
    model = load_policy_texts(texts)
    [candidate] = model.shadow_agents
    assert candidate.agent == "coder" and candidate.name == "coder-next"
    assert model.agent("coder").rules[0].methods == ("GET",)  # type: ignore[union-attr]
    shadowed = shadow_model(model)
    assert shadowed.agent("coder").rules[0].paths == ("/v2/*",)  # type: ignore[union-attr]
    assert shadowed_agents(model) == {"coder"}
    assert routes_of(model) == ["allow/coder/search-api/0/0"]


def test_a_shadow_group_makes_each_of_its_rules_shadow() -> None:
    group = (
        f"{HEAD}kind: AgentGroup\nmetadata: {{name: team}}\nspec:\n  agents: [coder]\n"
        "  mode: shadow\n  egress:\n    - destination: raw\n"
    )
    model = load_policy_texts(base(coder=agent("coder", LIVE), team=group))
    assert [r.mode for r in model.agent("coder").rules] == ["enforce", "shadow"]  # type: ignore[union-attr]


def test_shadow_errors_say_what_and_where() -> None:
    assert problems(base(coder=agent("coder", LIVE + "      mode: dry-run\n"))) == [
        'p/coder.yaml:9:13: mode "dry-run": must be one of enforce, shadow'
    ]
    twice = base(
        coder=agent("coder", LIVE),
        a=shadow_policy(LIVE, "a"),
        b=shadow_policy(LIVE, "b"),
    )
    [problem] = problems(twice)
    assert problem.startswith('p/b.yaml:5:10: agent "coder" already has a shadow AgentPolicy')
    [alone] = problems(base(next=shadow_policy(LIVE)))
    assert alone.startswith('p/next.yaml:5:10: shadow AgentPolicy for agent "coder", which has')


def test_plan_shows_shadow_changes_apart() -> None:
    before = load_policy_texts(base(coder=agent("coder", LIVE)))
    after = load_policy_texts(
        base(coder=agent("coder", SHADOW_RULE + LIVE), next=shadow_policy(LIVE))
    )
    text = render_plan_text(diff_policies(before, after))
    assert "[shadow] search-api POST" in text
    assert "coder (shadow)" in text

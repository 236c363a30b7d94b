"""Plan: diff two compiled policies and render it."""

from __future__ import annotations

import dataclasses as dc
import json
from pathlib import Path

import pytest

from meshgate.errors import PolicyError
from meshgate.policy.loader import load_policy_dir
from meshgate.policy.model import Credentials, PolicyModel, RateLimit
from meshgate.policy.plan import diff_policies, plan_to_json, render_plan_text
from meshgate.policy.serialize import model_from_json, model_to_json

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def model() -> PolicyModel:
    return load_policy_dir(REPO / "policies")


def test_no_changes(model: PolicyModel) -> None:
    plan = diff_policies(model, dc.replace(model, version="other"))
    assert not plan.has_changes
    assert render_plan_text(plan).endswith("No changes.\n")
    assert plan_to_json(plan)["summary"] == {"add": 0, "change": 0, "remove": 0}


def test_initial_plan_adds_everything(model: PolicyModel) -> None:
    plan = diff_policies(None, model)
    text = render_plan_text(plan)
    assert "+ mesh default" in text
    assert "+ destination openai" in text
    assert "    + rule search GET /v1/search,/v1/docs/* 60/1m" in text
    assert text.endswith("Plan: 6 to add, 0 to change, 0 to remove.\n")


def test_field_level_changes(model: PolicyModel) -> None:
    researcher = model.agent("researcher")
    assert researcher is not None
    rules = list(researcher.rules)
    rules[0] = dc.replace(rules[0], rate_limit=RateLimit(30, 60))
    new = dc.replace(
        model,
        mesh=dc.replace(model.mesh, trust_domain="agents.prod"),
        destinations=(
            dc.replace(model.destinations[0], port=8080),
            *model.destinations[1:2],
        ),
        agents=(model.agents[0], dc.replace(researcher, rules=tuple(rules[:1]))),
        version="v2",
    )
    plan = diff_policies(model, new)
    assert render_plan_text(plan) == (
        f"Policy {model.version} -> v2\n"
        "\n"
        "~ mesh default\n"
        "    ~ trustDomain: agents.local -> agents.prod\n"
        "~ destination code-mcp\n"
        "    ~ port: 80 -> 8080\n"
        "- destination search\n"
        "~ agent researcher\n"
        "    - rule openai POST /v1/chat/completions,/v1/embeddings 30/1m\n"
        "    ~ rule search: rateLimit 60/1m -> 30/1m\n"
        "\n"
        "Plan: 0 to add, 3 to change, 1 to remove.\n"
    )
    js = plan_to_json(plan)
    assert js["summary"] == {"add": 0, "change": 3, "remove": 1}
    assert js["changes"][1] == {
        "action": "change",
        "kind": "destination",
        "name": "code-mcp",
        "details": [{"action": "change", "subject": "port", "before": "80", "after": "8080"}],
    }
    json.dumps(js)  # JSON-serialisable


def test_added_and_removed_agents(model: PolicyModel) -> None:
    coder = model.agents[0]
    new = dc.replace(model, agents=(dc.replace(coder, agent="tester", name="tester"),))
    text = render_plan_text(diff_policies(model, new))
    assert "+ agent tester\n" in text
    assert "- agent coder\n" in text and "- agent researcher\n" in text
    assert text.endswith("Plan: 1 to add, 0 to change, 2 to remove.\n")


def test_credential_format_change_never_shows_values(model: PolicyModel) -> None:
    openai = model.destination("openai")
    leaked = Credentials("Authorization", "openai-api-key", "Bearer sk-SECRETVALUE {secret}")
    new = dc.replace(
        model,
        destinations=tuple(
            dc.replace(d, credentials=leaked) if d is openai else d for d in model.destinations
        ),
    )
    plan = diff_policies(model, new)
    text = render_plan_text(plan) + json.dumps(plan_to_json(plan))
    assert "credentials.format changed" in text
    assert "SECRETVALUE" not in text
    assert "SECRETVALUE" not in render_plan_text(diff_policies(None, new))


def test_model_json_round_trip_is_exact(model: PolicyModel) -> None:
    data = json.loads(json.dumps(model_to_json(model)))
    assert model_from_json(data) == model
    assert data["format"] == 1


@pytest.mark.parametrize("bad", [None, [], {"format": 2}, {"format": 1, "mesh": {}}])
def test_model_from_bad_json_raises_policy_error(bad: object) -> None:
    with pytest.raises(PolicyError):
        model_from_json(bad)


def test_pacing_and_argument_rule_changes_show(tmp_path: Path) -> None:
    """A changed budget, ceiling or argument pattern is a change the plan names."""
    (tmp_path / "mesh.yaml").write_text(
        "apiVersion: meshgate.dev/v1\nkind: Mesh\nmetadata: {name: m}\n"
        "spec: {trustDomain: agents.local}\n---\n"
        "apiVersion: meshgate.dev/v1\nkind: Destination\nmetadata: {name: llm}\n"
        "spec: {host: api.openai.com, port: 443, llm: {api: openai}}\n---\n"
        "apiVersion: meshgate.dev/v1\nkind: Destination\nmetadata: {name: gh}\n"
        "spec: {host: mcp.github.internal, port: 443}\n"
    )
    agent = (
        "apiVersion: meshgate.dev/v1\nkind: AgentPolicy\nmetadata: {name: coder}\n"
        "spec:\n  agent: coder\n  budgets: [{name: d, window: day, requests: 10}]\n"
        "  egress:\n    - destination: llm\n      maxTokens: 100\n"
        "    - destination: gh\n"
        '      tools: [{name: create_issue, arguments: {repo: {pattern: "^acme/.*$"}}}]\n'
    )
    (tmp_path / "coder.yaml").write_text(agent)
    before = load_policy_dir(tmp_path)
    assert model_from_json(model_to_json(before)) == before  # the running plane's copy
    changed = (
        agent.replace("requests: 10", "requests: 20")
        .replace("maxTokens: 100", "maxTokens: 200")
        .replace("^acme/.*$", "^acme/[a-z]*$")
    )
    (tmp_path / "coder.yaml").write_text(changed)
    text = render_plan_text(diff_policies(before, load_policy_dir(tmp_path)))
    assert "budgets: d 10 requests/day (store down: closed) -> d 20 requests/day" in text
    assert "rule llm: maxTokens 100 -> 200" in text
    assert "pattern=^acme/[a-z]*$" in text and "pattern=^acme/.*$" in text

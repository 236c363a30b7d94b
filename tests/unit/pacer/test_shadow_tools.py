"""Shadow mode's tool-argument rules: carried on routes the pacer already reads, decided by the
pacer beside the live rules, recorded and never acted on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from test_pacer_mcp import FACTS

from meshgate.mcp.decision import tool_policy
from meshgate.pacer import mcp
from meshgate.policy.loader import load_policy_texts
from meshgate.xds.gateway import egress_routes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "xds"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "policy"))
from policy_texts import HEAD, agent, base
from test_pacing_translation import pace_of, routes_named

LIVE = "    - destination: search-api\n      tools: [create_issue, search]\n"
SHADOW = (
    f"{HEAD}kind: AgentPolicy\nmetadata: {{name: coder-next}}\nspec:\n  agent: coder\n"
    "  mode: shadow\n  egress:\n    - destination: search-api\n      tools:\n"
    "        - search\n        - name: create_issue\n"
    "          arguments: {repo: {prefix: acme/}}\n"
)


def body(name: str, arguments: dict[str, str]) -> bytes:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
    message["params"] = {"name": name, "arguments": arguments}  # type: ignore[assignment]
    return json.dumps(message).encode()


def test_the_pacer_records_what_shadow_argument_rules_would_refuse() -> None:
    model = load_policy_texts(base(coder=agent("coder", LIVE), next=SHADOW))
    routes = routes_named(egress_routes(model, {}), "allow/coder/search-api/")
    paces = {pace_of(r) for r in routes}
    assert len(paces) == 1
    (pace,) = paces
    assert pace is not None and pace.mcp is not None and pace.shadow_mcp is not None
    live, shadow = mcp.policy(pace.mcp), mcp.policy(pace.shadow_mcp)
    for name, args, would_refuse in (
        ("create_issue", {"repo": "acme/x"}, False),
        ("create_issue", {"repo": "evil/x"}, True),
        ("search", {"q": "x"}, False),
    ):
        checked = mcp.check(live, False, FACTS, (), body(name, args))
        assert checked.refusal is None  # the live rules allow every one of them
        refused = mcp.shadow_refusal(shadow, checked, FACTS)
        assert refused.startswith("argument_refused: ") == would_refuse, (name, args, refused)


def test_no_shadow_rules_for_the_destination_carry_nothing() -> None:
    model = load_policy_texts(base(coder=agent("coder", LIVE)))
    [pace] = {pace_of(r) for r in routes_named(egress_routes(model, {}), "allow/coder/")}
    assert pace is not None and pace.shadow_mcp is None
    assert tool_policy(model.agents[0], "search-api") is not None


def test_a_route_is_never_paced_only_for_shadow_mode() -> None:
    plain = "    - destination: search-api\n"
    model = load_policy_texts(base(coder=agent("coder", plain), next=SHADOW))
    assert all(pace_of(r) is None for r in routes_named(egress_routes(model, {}), "allow/"))

"""Replay: the candidate's generated route table evaluated on recorded requests."""

from __future__ import annotations

import pytest
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import string_pb2

from meshgate.policy.model import (
    AgentPolicy,
    Credentials,
    Destination,
    EgressRule,
    HeaderMatch,
    Mesh,
    PolicyModel,
)
from meshgate.replay.compare import RecordGroup, recorded_outcome, replay, report_json, report_text
from meshgate.replay.routes import PolicyRoutes, Request, RouteTable, UnsupportedMatch
from meshgate.xds.gateway import egress_routes

DESTS = (
    Destination("api", "api.internal", 80, tls="none", address=("127.0.0.1", 9001)),
    Destination("mcp", "mcp.internal", 80, tls="none", address=("127.0.0.1", 9002)),
    Destination("raw", "raw.example", 443, tls="passthrough"),
    Destination(
        "keyed",
        "keyed.internal",
        80,
        tls="none",
        address=("127.0.0.1", 9003),
        credentials=Credentials("authorization", "key"),
    ),
)


def policy(*rules: EgressRule, agent: str = "coder", version: str = "v2") -> PolicyModel:
    return PolicyModel(
        Mesh(trust_domain="agents.test"), DESTS, (AgentPolicy(agent, agent, rules),), version
    )


BASE = policy(
    EgressRule("api", ("GET",), ("/v1/*",)),
    EgressRule("mcp", ("POST",), ("/mcp",), tools=("read_file",)),
    EgressRule("raw"),
    EgressRule("keyed"),
)


def decide(model: PolicyModel, request: Request) -> tuple[str, str]:
    d = PolicyRoutes(model).evaluate(request).decision
    return d.decision, d.reason


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (Request("coder", "api.internal", "GET", "/v1/items"), ("allowed", "")),
        (Request("coder", "API.Internal:80", "GET", "/v1/"), ("allowed", "")),
        (Request("coder", "api.internal", "GET", "/v2/items"), ("denied", "egress_denied")),
        (Request("coder", "api.internal", "POST", "/v1/items"), ("denied", "egress_denied")),
        (Request("other", "api.internal", "GET", "/v1/items"), ("denied", "egress_denied")),
        (Request("", "api.internal", "GET", "/v1/items"), ("denied", "egress_denied")),
        (Request("coder", "api.internal:8080", "GET", "/v1/x"), ("denied", "unknown_destination")),
        (Request("coder", "nowhere.example", "GET", "/"), ("denied", "unknown_destination")),
        (Request("coder", "nowhere.example", "CONNECT", ""), ("denied", "unknown_destination")),
        (Request("coder", "raw.example:443", "CONNECT", ""), ("allowed", "")),
        (Request("coder", "raw.example:443", "GET", "/"), ("denied", "egress_denied")),
        (Request("coder", "api.internal:80", "CONNECT", ""), ("denied", "egress_denied")),
        (Request("coder", "keyed.internal", "DELETE", "/x"), ("allowed", "")),
        # MCP: what the filter read decides
        (Request("coder", "mcp.internal", "POST", "/mcp", "tools/list", "", True), ("allowed", "")),
        (
            Request("coder", "mcp.internal", "POST", "/mcp", "tools/call", "read_file", True),
            ("allowed", ""),
        ),
        (
            Request("coder", "mcp.internal", "POST", "/mcp", "tools/call", "write_file", True),
            ("denied", "tool_denied"),
        ),
        (
            Request("coder", "mcp.internal", "POST", "/mcp", "tools/call", "read_file_x", True),
            ("denied", "tool_denied"),
        ),
        (
            Request("coder", "mcp.internal", "POST", "/mcp", "", "", True),
            ("denied", "mcp_unparsed"),
        ),
        (Request("coder", "mcp.internal", "POST", "/mcp", "", "", False), ("allowed", "")),
        (
            Request("coder", "mcp.internal", "GET", "/mcp", "", "", False),
            ("denied", "egress_denied"),
        ),
    ],
)
def test_the_generated_routes_decide(request_: Request, expected: tuple[str, str]) -> None:
    assert decide(BASE, request_) == expected


def test_mtls_agents_are_matched_by_spiffe_id() -> None:
    ok = Request("spiffe://agents.test/agent/coder", "api.internal", "GET", "/v1/a")
    assert decide(BASE, ok) == ("allowed", "")
    other_domain = Request("spiffe://elsewhere/agent/coder", "api.internal", "GET", "/v1/a")
    assert decide(BASE, other_domain) == ("denied", "egress_denied")
    assert PolicyRoutes(BASE).evaluate(ok).decision.agent == "coder"


def test_a_rule_header_the_records_do_not_hold_leaves_the_decision_open() -> None:
    model = policy(EgressRule("api", headers=(HeaderMatch("x-team", "a"),)))
    verdict = PolicyRoutes(model).evaluate(Request("coder", "api.internal", "GET", "/"))
    assert verdict.undecided
    assert verdict.unknown_headers == ("x-team",)
    assert [d.decision for d in verdict.decisions] == ["allowed", "denied"]
    # an agent the rule does not name is refused whatever the header says
    assert not PolicyRoutes(model).evaluate(Request("x", "api.internal", "GET", "/")).undecided


def test_a_matcher_the_translation_does_not_emit_fails_loudly() -> None:
    config = egress_routes(BASE, {"key": ""})
    config.virtual_hosts[0].routes[0].match.case_sensitive.value = False
    with pytest.raises(UnsupportedMatch, match="case_sensitive"):
        RouteTable(config)
    config = egress_routes(BASE, {"key": ""})
    config.virtual_hosts[0].routes[0].match.headers[0].string_match.CopyFrom(
        string_pb2.StringMatcher(prefix="co")
    )
    with pytest.raises(UnsupportedMatch, match="prefix"):
        RouteTable(config)
    # a header the records do not hold is checked all the same
    teams = policy(EgressRule("api", headers=(HeaderMatch("x-team", "a"),)))
    config = egress_routes(teams, {"key": ""})
    config.virtual_hosts[0].routes[0].match.headers[1].string_match.CopyFrom(
        string_pb2.StringMatcher(suffix="a")
    )
    with pytest.raises(UnsupportedMatch, match="suffix"):
        RouteTable(config)
    config = egress_routes(BASE, {"key": ""})
    config.virtual_hosts[0].domains.append("*.internal")
    with pytest.raises(UnsupportedMatch, match="wildcard"):
        RouteTable(config)
    config = egress_routes(BASE, {"key": ""})
    config.virtual_hosts[0].routes[0].match.ClearField("path_specifier")
    config.virtual_hosts[0].routes[0].match.safe_regex.regex = "/v1/.*"
    with pytest.raises(UnsupportedMatch, match="safe_regex"):
        RouteTable(config)
    config = egress_routes(BASE, {"key": ""})
    config.virtual_hosts[0].routes.append(rc.Route(name="mine", match=rc.RouteMatch(prefix="/")))
    with pytest.raises(UnsupportedMatch, match="says no decision"):
        RouteTable(config)


def group(
    request: Request,
    decision: str,
    reason: str = "",
    count: int = 1,
    by_gateway: bool = True,
    destination: str = "",
) -> RecordGroup:
    return RecordGroup(
        request.agent,
        "",
        request.host,
        request.method,
        request.path,
        request.mcp_method,
        request.mcp_tool,
        request.has_body,
        by_gateway,
        decision,
        reason,
        destination,
        count,
        f"rid-{count}",
        "2026-12-01T00:00:00+00:00",
    )


def test_recorded_outcomes_at_route_level() -> None:
    assert recorded_outcome("allowed", "") == "allowed"
    assert recorded_outcome("rate_limited", "rate_limited") == "allowed"
    assert recorded_outcome("upstream_error", "upstream_reset") == "allowed"
    assert recorded_outcome("upstream_error", "credential_unavailable") is None
    assert recorded_outcome("denied", "tool_denied") == "refused: tool_denied"
    assert recorded_outcome("denied", "path_not_canonical") is None
    assert recorded_outcome("denied", "mcp_unparsed: mcp_invalid_json") is None


def test_report_counts_changes_per_agent_destination_and_tool() -> None:
    candidate = policy(
        EgressRule("api", ("GET", "POST"), ("/v1/*",)),
        EgressRule("mcp", ("POST",), ("/mcp",), tools=("search",)),
    )
    groups = [
        group(Request("coder", "api.internal", "GET", "/v1/a"), "allowed", count=700),
        group(Request("coder", "api.internal", "POST", "/v1/a"), "denied", "egress_denied", 5),
        group(
            Request("coder", "mcp.internal", "POST", "/mcp", "tools/call", "read_file", True),
            "allowed",
            count=40,
            destination="mcp",
        ),
        group(
            Request("coder", "mcp.internal", "POST", "/mcp", "tools/call", "read_file", True),
            "rate_limited",
            "rate_limited",
            count=2,
            destination="mcp",
        ),
        group(Request("coder", "raw.example:443", "CONNECT", ""), "allowed", count=3),
        group(Request("coder", "api.internal", "GET", "/v1/a"), "denied", "path_too_long", 9),
        group(Request("coder", "api.internal", "GET", "/"), "upstream_error", "x", 4, False),
    ]
    report = replay(groups, PolicyRoutes(candidate), since="7d")
    assert (report.records, report.replayed) == (763, 750)
    assert (report.newly_refused, report.newly_allowed, report.unchanged) == (45, 5, 700)
    assert report.exit_code == 2
    data = report_json(report)
    changes = {(c["change"], c["destination"], c["tool"]): c for c in data["changes"]}
    assert changes[("newly_refused", "mcp", "read_file")]["requests"] == 42
    assert changes[("newly_refused", "mcp", "read_file")]["now"] == "refused: tool_denied"
    assert changes[("newly_refused", "raw", "")]["now"] == "refused: egress_denied"
    assert changes[("newly_allowed", "api", "")]["examples"][0]["requests"] == 5
    assert data["not_replayed_records"] == {
        "denied: path_too_long": 9,
        "logged by a sidecar (never reached a gateway)": 4,
    }
    text = report_text(report)
    assert "newly refused: 45" in text
    assert "not replayed: path guard" in text and "rate limits" in text and "budgets" in text
    same = replay(groups[:1], PolicyRoutes(candidate))
    assert same.exit_code == 0
    assert "No recorded request changes its decision." in report_text(same)


def test_a_sub_agents_records_are_not_replayed() -> None:
    """A sub-agent's rights are its parent's narrowed at run time, in no policy file: its
    records cannot say what a candidate policy changes, so they are counted apart."""
    candidate = policy(EgressRule("api", ("GET",), ("/v1/*",)))
    report = replay(
        [
            group(Request("coder.web-1", "api.internal", "GET", "/v1/a"), "allowed", count=3),
            group(Request("coder", "api.internal", "GET", "/v1/a"), "allowed", count=2),
        ],
        PolicyRoutes(candidate),
    )
    assert (report.replayed, report.newly_refused) == (2, 0)
    [(why, n)] = report.not_replayed.items()
    assert why.startswith("a sub-agent's") and n == 3

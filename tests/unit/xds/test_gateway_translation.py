"""The gateway translation's hardening, checked on the generated Envoy config (fast; the
hostile-agent tests in tests/security/test_gateway_*.py drive real Envoys)."""

from __future__ import annotations

import re

from builders import model
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2
from test_pacing_translation import pace_of

from meshgate.audit.ingest import decide
from meshgate.mcp import decision
from meshgate.policy.model import AgentPolicy, Destination, EgressRule, RateLimit
from meshgate.xds.access_log import SPOOL_FORMAT, local_refusal, route_decision
from meshgate.xds.allowlist import (
    BODY_GUARD_FILTER,
    MCP_FILTER,
    NO_UPSTREAM,
    RATE_LIMIT_FILTER,
    RULE_KEY,
)
from meshgate.xds.gateway import (
    BUFFER_FILTER,
    NON_CANONICAL_PATH,
    PATH_FILTER,
    STRIPPED_HEADERS,
    egress_routes,
    gateway_resources,
)
from meshgate.xds.options import TranslateOptions
from meshgate.xds.pacing import PACER_FILTER

DOCS = Destination("docs", "docs.internal", 80, tls="none", address=("127.0.0.1", 9001))
MCP = Destination("mcp", "mcp.internal", 80, tls="none", address=("127.0.0.1", 9002))
LIMIT = RateLimit(3, 60)
AGENTS = (
    AgentPolicy(
        "r",
        "researcher",
        (
            EgressRule("docs", ("GET",), ("/a", "/b/*"), rate_limit=LIMIT),
            EgressRule("mcp", (), ("/mcp",), tools=("read_file",), rate_limit=LIMIT),
        ),
    ),
    AgentPolicy("c", "coder", (EgressRule("docs", ("GET",), ("/a",), rate_limit=LIMIT),)),
)
MODEL = model(destinations=(DOCS, MCP), agents=AGENTS)


def _hcm() -> hcm_pb2.HttpConnectionManager:
    out = gateway_resources(MODEL, TranslateOptions())
    [listener] = [r for r in out if isinstance(r, listener_pb2.Listener)]
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def _vhost(name: str) -> rc.VirtualHost:
    table: route_pb2.RouteConfiguration = egress_routes(MODEL, {})
    return next(v for v in table.virtual_hosts if v.name == name)


def test_paths_are_normalised_and_agent_headers_stripped_before_routing() -> None:
    hcm = _hcm()
    assert hcm.normalize_path.value and hcm.merge_slashes
    assert hcm.path_with_escaped_slashes_action == hcm_pb2.HttpConnectionManager.REJECT_REQUEST
    removed = set()
    for ext in hcm.early_header_mutation_extensions:
        mutation = header_mutation_pb2.HeaderMutation()
        if ext.typed_config.Unpack(mutation):
            removed |= {m.remove for m in mutation.mutations if m.remove}
    assert set(STRIPPED_HEADERS) <= removed
    assert {"x-meshgate-identity", "x-http-method-override", "x-request-id"} <= removed
    names = [f.name for f in hcm.http_filters]
    # the path guard first; the MCP body pipeline in order, before the rate limiter
    assert names[0] == PATH_FILTER
    assert names.index(BUFFER_FILTER) < names.index(MCP_FILTER) < names.index(BODY_GUARD_FILTER)
    assert names.index(BODY_GUARD_FILTER) < names.index(RATE_LIMIT_FILTER)
    for name in (BUFFER_FILTER, MCP_FILTER, BODY_GUARD_FILTER):  # only for tool hosts
        wrapped = extension_matcher_pb2.ExtensionWithMatcher()
        assert next(f for f in hcm.http_filters if f.name == name).typed_config.Unpack(wrapped)


def test_non_canonical_path_pattern() -> None:
    bad = ["/a/..;/b", "/a/.;x", "/a/..%3B/b", "/a\\b", "/a/%5c", "/a/%2E%2e", "/a/%2F", "/a/../b"]
    good = ["/a/b", "/a;b/c", "/a..b/", "/a/...", "/v1/docs/file.json"]
    pattern = re.compile(NON_CANONICAL_PATH)  # Envoy matches the whole path
    assert all(pattern.fullmatch(p) for p in bad)
    assert not any(pattern.fullmatch(p) for p in good)


def test_a_rule_is_one_bucket_shared_by_its_routes() -> None:
    docs = _vhost("docs")
    limits = local_rate_limit_pb2.LocalRateLimit()
    assert docs.typed_per_filter_config[RATE_LIMIT_FILTER].Unpack(limits)
    keys = [d.entries[0].value for d in limits.descriptors]
    assert keys == ["researcher/docs/0", "coder/docs/0"]  # one per agent and rule
    assert all(d.token_bucket.max_tokens == 3 for d in limits.descriptors)
    assert not limits.always_consume_default_token_bucket.value
    assert limits.enable_x_ratelimit_headers
    allow = [r for r in docs.routes if r.name.startswith("allow/researcher/")]
    assert len(allow) == 2  # two paths, two routes...
    for route in allow:  # ...one bucket: no route has a bucket of its own
        assert RATE_LIMIT_FILTER not in route.typed_per_filter_config
        [action] = route.route.rate_limits[0].actions
        assert (action.generic_key.descriptor_key, action.generic_key.descriptor_value) == (
            RULE_KEY,
            "researcher/docs/0",
        )
    mcp = _vhost("mcp")  # a tool rule's several routes draw from one bucket too
    tool_routes = [r for r in mcp.routes if r.name.startswith("allow/researcher/")]
    assert len(tool_routes) == 3
    assert {
        r.route.rate_limits[0].actions[0].generic_key.descriptor_value for r in tool_routes
    } == {"researcher/mcp/1"}


def test_tool_rules_admit_only_what_the_parser_described_or_a_bodyless_request() -> None:
    routes = _vhost("mcp").routes
    names = [r.name for r in routes]
    assert names == [
        "allow/researcher/mcp/1/0",  # parsed, not tools/call
        "allow/researcher/mcp/1/1",  # parsed tools/call of a listed tool
        "allow/researcher/mcp/1/2",  # no body at all
        "deny-tool/mcp/researcher",  # its other tool calls: the pacer answers them MCP's way
        "deny-tool/mcp",
        "mcp-unparsed/mcp",
        "mcp-unparsed/mcp",
        "deny-connect/mcp",
        "deny/mcp",
    ]
    other, call, bodyless = routes[:3]
    # every forwarding route requires the parser's metadata or proves there is no body
    assert [
        (m.invert, m.value.WhichOneof("match_pattern")) for m in other.match.dynamic_metadata
    ] == [
        (False, "present_match"),
        (True, "string_match"),
    ]
    assert len(call.match.dynamic_metadata) == 2
    assert bodyless.match.dynamic_metadata[0].invert
    assert {h.name for h in bodyless.match.headers} >= {"transfer-encoding", "content-length"}
    assert BODY_GUARD_FILTER in bodyless.typed_per_filter_config
    assert BODY_GUARD_FILTER not in other.typed_per_filter_config
    # the docs host has no tool rules: no MCP refusals there
    assert not [r for r in _vhost("docs").routes if r.name.startswith(("deny-tool", "mcp-"))]


def test_refusal_routes_and_filter_refusals_are_audited_as_denied() -> None:
    for name, reason in (
        ("deny-tool/mcp", "tool_denied"),
        ("deny-tool/mcp/researcher", "tool_denied"),
        ("mcp-unparsed/mcp", "mcp_unparsed"),
    ):
        decided = route_decision(name)
        assert decided is not None and (decided.decision, decided.reason) == ("denied", reason)
    agent_refusal = route_decision("deny-tool/mcp/researcher")
    assert agent_refusal is not None and agent_refusal.agent == "researcher"
    # the pacer's MCP refusals on an allow route are denials with their own reason; on the
    # agent's refusal route the route's reason stays
    assert decide("allowed", "", 200, set(), "argument_refused") == (
        "denied",
        "argument_refused",
    )
    assert decide("allowed", "", 200, set(), "tool_denied") == ("denied", "tool_denied")
    assert decide("denied", "tool_denied", 400, set(), "jsonrpc_unreadable") == (
        "denied",
        "tool_denied",
    )
    too_long = "rbac_access_denied_matched_policy[path-too-long]"
    assert local_refusal(too_long) == "path_too_long"
    assert decide("allowed", "", 414, set(), too_long) == ("denied", "path_too_long")
    assert decide("denied", "mcp_unparsed", 403, set(), "mcp_not_jsonrpc") == (
        "denied",
        "mcp_unparsed: mcp_not_jsonrpc",
    )
    assert local_refusal("via_upstream") is None
    assert SPOOL_FORMAT["path"] == "%REQ(:PATH)%"  # whole, and never an agent-sent header
    assert "mcp_method" in SPOOL_FORMAT and "mcp_tool" in SPOOL_FORMAT


def test_tool_routes_hand_the_pacer_the_agents_tool_rules() -> None:
    routes = {r.name: r for r in _vhost("mcp").routes}
    [agent] = [a for a in MODEL.agents if a.agent == "researcher"]
    expected = decision.encode(decision.tool_policy(agent, "mcp"))
    for name in ("allow/researcher/mcp/1/0", "allow/researcher/mcp/1/1"):
        pace = pace_of(routes[name])
        assert pace is not None and pace.mcp == expected and not pace.mcp_refuse
    refusal = pace_of(routes["deny-tool/mcp/researcher"])
    assert refusal is not None and refusal.mcp == expected and refusal.mcp_refuse
    # a forwarding route (so Envoy adds the policy-version header to the pacer's answer) whose
    # cluster no gateway has: were the pacer ever to let the call through, the router refuses it
    assert routes["deny-tool/mcp/researcher"].route.cluster == NO_UPSTREAM
    clusters = [r for r in gateway_resources(MODEL, TranslateOptions()) if hasattr(r, "name")]
    assert NO_UPSTREAM not in {c.name for c in clusters}
    # Envoy creates the pacer from the route chosen before the MCP filter re-selects: every
    # route of a tool host turns it on, and those without a PaceSpec tell it to skip
    for name in ("mcp-unparsed/mcp", "deny-tool/mcp", "deny/mcp"):
        assert PACER_FILTER in routes[name].typed_per_filter_config
        config = rc.FilterConfig()
        routes[name].typed_per_filter_config[PACER_FILTER].Unpack(config)
        assert not config.disabled
    # hosts without tool rules are untouched
    assert all(PACER_FILTER not in r.typed_per_filter_config for r in _vhost("docs").routes)


def test_a_tool_rules_sse_get_resumes_no_stream() -> None:
    """A resumed stream would replay answers to earlier requests (tools/list among them)
    unread by the pacer; the body-less route of a tool rule drops Last-Event-ID."""
    mcp = _vhost("mcp")
    tool_routes = [r for r in mcp.routes if r.name.startswith("allow/researcher/")]
    bodyless = [r for r in tool_routes if BODY_GUARD_FILTER in r.typed_per_filter_config]
    assert len(bodyless) == 1
    assert list(bodyless[0].request_headers_to_remove) == ["last-event-id"]
    others = [r for r in tool_routes if r not in bodyless]
    assert others and not any(r.request_headers_to_remove for r in others)


def test_a_wildcard_host_stands_for_one_label() -> None:
    wild = Destination("wild", "*.wild.internal", 80, tls="none", address=("127.0.0.1", 9003))
    agent = AgentPolicy("w", "w", (EgressRule("wild"),))
    table = egress_routes(model(destinations=(wild,), agents=(agent,)), {})
    vhost = next(v for v in table.virtual_hosts if v.name == "wild")
    first = vhost.routes[:2]
    assert [r.name for r in first] == ["unknown-destination"] * 2
    assert first[0].match.HasField("connect_matcher") and first[1].match.prefix == "/"
    [authority] = first[1].match.headers
    assert authority.name == ":authority"
    deeper = re.compile(authority.string_match.safe_regex.regex)  # RE2 and Python agree here
    for host in ("x.y.wild.internal", "X.Y.WILD.INTERNAL:80", "a.b.c.wild.internal."):
        assert deeper.fullmatch(host), host
    for host in ("x.wild.internal", "x.wild.internal:80", "x-y.wild.internal"):
        assert not deeper.fullmatch(host), host
    assert vhost.routes[2].name.startswith("allow/w/wild/")

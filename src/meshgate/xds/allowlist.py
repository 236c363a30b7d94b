"""Per-agent allowlists as Envoy routes: one route per (agent, rule, path), then a refusal.

The agent's identity arrives in AGENT_HEADER, which the agent's sidecar sets and overwrites
(the identity issue replaces it with the verified client certificate). A rule's rate limit is
one token bucket per agent and rule (per gateway instance), however many routes the rule
becomes: the bucket lives in the destination's virtual host (`rate_limit_config`), and every
route of the rule names it with a `generic_key` rate-limit action.

MCP tool rules fail closed (`_tool_matches`, `mcp_refusal_routes`): a request is forwarded under
a tool rule only when the MCP filter described it (a JSON-RPC method other than `tools/call`, or
`tools/call` of a listed tool) or when it has no body at all. A request with a body that the
filter did not describe is refused (`mcp_unparsed`), and so is a body over MCP_BODY_LIMIT (the
gateway buffers whole bodies for tool hosts, so the parser always sees all of it).

The routes select by tool name; the gateway's pacer then reads the same body strictly and
checks the arguments (the rule's PaceSpec carries the agent's tool rules, `PaceSpec.mcp`). A
call the routes refuse meets the agent's own refusal route (`mcp_agent_refusal_route`), where
the pacer answers it as MCP expects, so the model reads why.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from meshgate.pacing.spec import PaceSpec
from meshgate.policy.model import (
    Destination,
    EgressRule,
    PolicyModel,
    agent_spiffe_id,
    shadow_model,
    shadowed_agents,
)
from meshgate.xds.access_log import BODY_GUARD_POLICY, agent_tool_refusal_name, allow_route_name
from meshgate.xds.common import json_refusal, pack
from meshgate.xds.pacing import (
    GLOBAL_LIMITS_FILTER,
    PACER_FILTER,
    global_limit,
    global_limits_route_config,
    pace_spec,
    pacer_route_config,
    pacer_skip_config,
)

AGENT_HEADER = "x-meshgate-agent"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
LAST_EVENT_ID = "last-event-id"
BODY_GUARD_FILTER = "meshgate.mcp-body-guard"  # RBAC, configured only on body-less tool routes


# (agent, index of the rule in its policy, rule, what the pacer enforces on it or None)
Grant = tuple[str, int, EgressRule, PaceSpec | None]


def grants_by_destination(model: PolicyModel) -> dict[str, tuple[Grant, ...]]:
    """Every enforced rule, grouped by the destination it names, in policy order (shadow rules
    are never translated: `audit.shadow` evaluates them; indices stay the policy's)."""
    grouped: dict[str, list[Grant]] = {d.name: [] for d in model.destinations}
    destinations = {d.name: d for d in model.destinations}
    # the shadow versions of the agents shadow mode concerns (the others have none)
    shadowed = shadowed_agents(model)
    shadows = (
        {a.agent: a for a in shadow_model(model).agents if a.agent in shadowed} if shadowed else {}
    )
    for agent in model.agents:
        for index, rule in enumerate(agent.rules):
            if not rule.enforced:
                continue
            dest = destinations.get(rule.destination)
            pace = None
            if dest is not None:  # a tunnel is a request too: the agent's budgets count it
                pace = pace_spec(model.mesh, agent, index, rule, dest, shadows.get(agent.agent))
            grouped.setdefault(rule.destination, []).append((agent.agent, index, rule, pace))
    return {name: tuple(grants) for name, grants in grouped.items()}


def paced(grants: Mapping[str, tuple[Grant, ...]]) -> bool:
    return any(g[3] is not None for gs in grants.values() for g in gs)


def destination_routes(
    dest: Destination, cluster: str, grants: tuple[Grant, ...], trust_domain: str | None = None
) -> list[rc.Route]:
    """`trust_domain` set: agents are recognised by the SPIFFE ID the gateway took from their
    verified certificate; otherwise by the name their sidecar stamped."""
    routes: list[rc.Route] = []
    for agent, index, rule, pace in grants:
        identity = agent_spiffe_id(trust_domain, agent) if trust_domain else agent
        routes.extend(rule_routes(agent, dest, index, rule, cluster, identity, pace))
    if dest.tls != "passthrough" and any(g[2].tools for g in grants):
        policies: dict[str, str] = {}  # agent -> its tool rules (the same on each tool rule)
        for agent, _, _, pace in grants:
            if pace is not None and pace.mcp is not None:
                policies.setdefault(agent, pace.mcp)
        for agent, text in policies.items():
            identity = agent_spiffe_id(trust_domain, agent) if trust_domain else agent
            routes.append(mcp_agent_refusal_route(dest, agent, identity, text))
        routes.extend(mcp_refusal_routes(dest))
        mcp_host = True
    else:
        mcp_host = False
    tunnel_reason = connect_refusal_reason(dest)
    for name, match, reason in (
        (
            "deny-connect",
            rc.RouteMatch(connect_matcher=rc.RouteMatch.ConnectMatcher()),
            tunnel_reason,
        ),
        ("deny", rc.RouteMatch(prefix="/"), "no rule of this agent allows this method and path"),
    ):
        routes.append(
            rc.Route(
                name=f"{name}/{dest.name}",
                match=match,
                direct_response=json_refusal(
                    403,
                    {
                        "error": "egress_denied",
                        "agent": f"%REQ({AGENT_HEADER})%",
                        "destination": dest.name,
                        "reason": reason,
                    },
                ),
            )
        )
    if mcp_host:
        routes = [r if PACER_FILTER in r.typed_per_filter_config else _pacer_off(r) for r in routes]
    return routes


def connect_refusal_reason(dest: Destination) -> str:
    """Why the gateway refuses a CONNECT to `dest` (a sidecar with mTLS opens those to
    intercepted `tls: originate` destinations itself, so the gateway sees only the others)."""
    if dest.tls == "passthrough":
        return "no rule of this agent allows a tunnel to this host"
    reason = f"tls: {dest.tls}: send plain HTTP through the proxy, not CONNECT"
    if dest.tls == "originate" and not dest.intercept:
        return reason + " (intercept: false)"
    if dest.tls == "originate":  # only without mTLS: no agent-trust certificates then
        return reason + " (https:// needs a control plane with mTLS)"
    return reason


def _pacer_off(route: rc.Route) -> rc.Route:
    """On an MCP tool host, every route says what the pacer does there.

    Envoy creates a filter that is off by default (the pacer) only if the route chosen from
    the request's headers turns it on; on a tool host that is a route chosen before Envoy's
    MCP filter has read the body (`mcp-unparsed/...`), and the route chosen after it (a tool
    route with its PaceSpec) comes too late. So routes here turn the filter on and, unless
    they carry a PaceSpec, tell it to skip the request (a copy: `rule_routes` is shared)."""
    out = rc.Route()
    out.CopyFrom(route)
    out.typed_per_filter_config[PACER_FILTER].CopyFrom(pacer_skip_config())
    return out


@functools.lru_cache(maxsize=200_000)
def rule_routes(
    agent: str,
    dest: Destination,
    index: int,
    rule: EgressRule,
    cluster: str,
    identity: str,
    pace: PaceSpec | None = None,
) -> tuple[rc.Route, ...]:
    """Memoised: a policy change rebuilds only the routes of rules that changed.

    Callers copy the returned messages into their own containers and never mutate them.
    """
    headers = [
        rc.HeaderMatcher(name=AGENT_HEADER, string_match=string_pb2.StringMatcher(exact=identity))
    ]
    if rule.methods:
        pattern = "|".join(re.escape(m) for m in rule.methods)
        headers.append(
            rc.HeaderMatcher(
                name=":method",
                string_match=string_pb2.StringMatcher(
                    safe_regex=regex_pb2.RegexMatcher(regex=f"^({pattern})$")
                ),
            )
        )
    for h in rule.headers:
        if h.value is None:
            headers.append(rc.HeaderMatcher(name=h.name, present_match=True))
        else:
            headers.append(
                rc.HeaderMatcher(name=h.name, string_match=string_pb2.StringMatcher(exact=h.value))
            )
    # the rule's one bucket, shared by all its routes: in the virtual host (per replica) or in
    # the pacer's store (global)
    limits = []
    limited: dict[str, any_pb2.Any] = {}
    if rule.rate_limit is not None and rule.rate_limit.scope == "global":
        limited[GLOBAL_LIMITS_FILTER] = global_limits_route_config(
            agent, [global_limit(agent, dest, index, rule)]
        )
    elif rule.rate_limit is not None:
        limits.append(rule_rate_limit(*rule.owner(agent, index), dest))
    if dest.tls == "passthrough":  # the gateway sees only the tunnel's host: one CONNECT route
        match = rc.RouteMatch(connect_matcher=rc.RouteMatch.ConnectMatcher(), headers=headers)
        return (
            rc.Route(
                name=allow_route_name(agent, dest.name, index, "connect"),
                match=match,
                route=rc.RouteAction(
                    cluster=cluster,
                    upgrade_configs=[
                        rc.RouteAction.UpgradeConfig(
                            upgrade_type="CONNECT",
                            connect_config=rc.RouteAction.UpgradeConfig.ConnectConfig(),
                        )
                    ],
                    rate_limits=limits,
                ),
                typed_per_filter_config=(
                    {**limited, PACER_FILTER: pacer_route_config(pace)} if pace else limited
                ),
            ),
        )
    bases = [_path_match(p) for p in rule.paths] or [rc.RouteMatch(prefix="/")]
    matches: list[tuple[rc.RouteMatch, dict[str, any_pb2.Any]]] = [(m, {}) for m in bases]
    if rule.tools:
        matches = [m for base in bases for m in _tool_matches(base, rule.tools)]
    routes = []
    for n, (match, per_filter) in enumerate(matches):
        per_filter.update(limited)
        if pace is not None:
            per_filter[PACER_FILTER] = pacer_route_config(pace)
        match.headers.extend(headers)
        route = rc.Route(
            name=allow_route_name(agent, dest.name, index, n),
            match=match,
            # no cap on a whole response (Envoy's default is 15 s): LLM streams run for
            # minutes; a stalled one still ends at the stream idle timeout (5 min)
            route=rc.RouteAction(
                cluster=cluster, rate_limits=limits, timeout=duration_pb2.Duration(seconds=0)
            ),
            typed_per_filter_config=per_filter,
        )
        if BODY_GUARD_FILTER in per_filter:
            # a body-less request of a tool rule (an SSE GET) resumes no stream: a resumed
            # stream replays answers to earlier requests, tools/list ones among them, which
            # the pacer reads and filters only on the POST that asked
            route.request_headers_to_remove.append(LAST_EVENT_ID)
        routes.append(route)
    return tuple(routes)


MCP_FILTER = "envoy.filters.http.mcp"


MCP_BODY_LIMIT = 1024 * 1024  # bytes of a request body the MCP filter reads; longer: refused


def _mcp_field(*path: str) -> list[metadata_pb2.MetadataMatcher.PathSegment]:
    return [metadata_pb2.MetadataMatcher.PathSegment(key=k) for k in path]


def _mcp_method(
    value: value_pb2.ValueMatcher, invert: bool = False
) -> metadata_pb2.MetadataMatcher:
    return metadata_pb2.MetadataMatcher(
        filter=MCP_FILTER, path=_mcp_field("method"), value=value, invert=invert
    )


_TOOLS_CALL = value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact="tools/call"))
_PRESENT = value_pb2.ValueMatcher(present_match=True)


def _no_body() -> list[rc.HeaderMatcher]:
    """HTTP/1.1 framing says there is no body: no Transfer-Encoding, Content-Length absent or 0.

    (Sidecars speak HTTP/1.1 to the gateway, where a body needs one of the two headers.)"""
    return [
        rc.HeaderMatcher(name="transfer-encoding", present_match=True, invert_match=True),
        rc.HeaderMatcher(
            name="content-length",
            string_match=string_pb2.StringMatcher(
                safe_regex=regex_pb2.RegexMatcher(regex="0*[1-9][0-9]*")
            ),
            invert_match=True,
            treat_missing_header_as_empty=True,
        ),
    ]


def _has_body() -> list[list[rc.HeaderMatcher]]:
    """The two ways a request has a body (each list: one route's headers)."""
    return [
        [rc.HeaderMatcher(name="transfer-encoding", present_match=True)],
        [
            rc.HeaderMatcher(
                name="content-length",
                string_match=string_pb2.StringMatcher(
                    safe_regex=regex_pb2.RegexMatcher(regex="0*[1-9][0-9]*")
                ),
            )
        ],
    ]


def _body_guard() -> any_pb2.Any:
    """Refuse a request that turns out to have a body after all.

    Envoy picks a route from the headers, before the body arrives; an HTTP/1.1 chunked body
    shows no framing header there. The gateway's buffer filter (tool hosts only) reads the whole
    body and sets Content-Length, then the MCP filter parses what it recognises (and re-selects
    the route); this guard, after both, refuses what is still on the body-less route with a body.
    """
    has_body = rbac_pb2.Permission(
        header=rc.HeaderMatcher(
            name="content-length",
            string_match=string_pb2.StringMatcher(
                safe_regex=regex_pb2.RegexMatcher(regex="0*[1-9][0-9]*")
            ),
        )
    )
    rules = rbac_pb2.RBAC(
        action=rbac_pb2.RBAC.DENY,
        policies={
            BODY_GUARD_POLICY: rbac_pb2.Policy(
                permissions=[has_body], principals=[rbac_pb2.Principal(any=True)]
            )
        },
    )
    return pack(http_rbac_pb2.RBACPerRoute(rbac=http_rbac_pb2.RBAC(rules=rules)))


def _tool_matches(
    base: rc.RouteMatch, tools: tuple[str, ...]
) -> list[tuple[rc.RouteMatch, dict[str, any_pb2.Any]]]:
    """What a tool rule admits, each only when proven, with each route's filter configs:

    - a body the MCP filter parsed as JSON-RPC whose method is not `tools/call`;
    - `tools/call` naming one of `tools`;
    - a request without a body (an SSE GET, a session DELETE): it carries no call
      (`_body_guard` refuses it if a body turns up after all).

    Anything else (a body the filter did not describe) falls through to `mcp_refusal_routes`.
    The MCP filter parses the JSON-RPC body into dynamic metadata and re-selects the route.
    """
    other_method = rc.RouteMatch()
    other_method.CopyFrom(base)
    other_method.dynamic_metadata.extend(
        [_mcp_method(_PRESENT), _mcp_method(_TOOLS_CALL, invert=True)]
    )
    allowed_call = rc.RouteMatch()
    allowed_call.CopyFrom(base)
    names = "|".join(re.escape(t) for t in tools)
    allowed_call.dynamic_metadata.extend(
        [
            _mcp_method(_TOOLS_CALL),
            metadata_pb2.MetadataMatcher(
                filter=MCP_FILTER,
                path=_mcp_field("params", "name"),
                value=value_pb2.ValueMatcher(
                    string_match=string_pb2.StringMatcher(
                        safe_regex=regex_pb2.RegexMatcher(regex=f"^({names})$")
                    )
                ),
            ),
        ]
    )
    bodyless = rc.RouteMatch()
    bodyless.CopyFrom(base)
    bodyless.dynamic_metadata.append(_mcp_method(_PRESENT, invert=True))
    bodyless.headers.extend(_no_body())
    return [(other_method, {}), (allowed_call, {}), (bodyless, {BODY_GUARD_FILTER: _body_guard()})]


def _tool_denied(dest: Destination) -> rc.DirectResponseAction:
    return json_refusal(
        403,
        {
            "error": "tool_denied",
            "agent": f"%REQ({AGENT_HEADER})%",
            "destination": dest.name,
            "tool": f"%DYNAMIC_METADATA({MCP_FILTER}:params:name):256%",
            "reason": "no rule of this agent allows this MCP tool",
        },
    )


# A cluster no gateway has: what a refusal route the pacer answers "forwards" to, should the
# pacer ever let a request through (the router then refuses it: 503, no cluster)
NO_UPSTREAM = "meshgate-refused"


@functools.lru_cache(maxsize=100_000)
def mcp_agent_refusal_route(dest: Destination, agent: str, identity: str, tools: str) -> rc.Route:
    """`deny-tool/<dest>/<agent>`: a `tools/call` none of the agent's rules routed. The pacer
    answers it (HTTP 200, a tool result with `isError` naming the tool, the agent's allowed
    tools and what to do) from the agent's tool rules, `tools` (`mcp.decision.encode`); it
    never forwards from here. Should it let the call through, the route leads nowhere.

    A forwarding route, not a `direct_response`: Envoy adds the route table's response
    headers (the policy version the audit record carries) to a filter's local reply only on
    routes with a route entry."""
    pace = PaceSpec(agent, dest.name, mcp=tools, mcp_refuse=True)
    return rc.Route(
        name=agent_tool_refusal_name(dest.name, agent),
        match=rc.RouteMatch(
            prefix="/",
            dynamic_metadata=[_mcp_method(_TOOLS_CALL)],
            headers=[
                rc.HeaderMatcher(
                    name=AGENT_HEADER, string_match=string_pb2.StringMatcher(exact=identity)
                )
            ],
        ),
        route=rc.RouteAction(cluster=NO_UPSTREAM),
        typed_per_filter_config={PACER_FILTER: pacer_route_config(pace)},
    )


def mcp_refusal_routes(dest: Destination) -> list[rc.Route]:
    """After every rule of a destination with tool rules, before its `deny` route:

    - `deny-tool/<dest>`: a parsed `tools/call` of an agent without tool rules here (403
      tool_denied; agents with tool rules meet their own `mcp_agent_refusal_route` first);
    - `mcp-unparsed/<dest>`: a request with a body the MCP filter has not described: not
      JSON-RPC, not sent with MCP's Content-Type and Accept, a GET or DELETE with a body, ...

    (Switching the filter to REJECT_NO_MCP with a per-route McpOverride was tried: in Envoy 1.40
    the filter then no longer re-selects the route after parsing, so valid calls were refused.
    PASS_THROUGH plus these routes is as strict, and other rules' traffic is unaffected.)
    """
    agent = f"%REQ({AGENT_HEADER})%"
    deny_tool = rc.Route(
        name=f"deny-tool/{dest.name}",
        match=rc.RouteMatch(prefix="/", dynamic_metadata=[_mcp_method(_TOOLS_CALL)]),
        direct_response=_tool_denied(dest),
    )
    unparsed = [
        rc.Route(
            name=f"mcp-unparsed/{dest.name}",
            match=rc.RouteMatch(
                prefix="/",
                dynamic_metadata=[_mcp_method(_PRESENT, invert=True)],
                headers=headers,
            ),
            direct_response=json_refusal(
                403,
                {
                    "error": "mcp_unparsed",
                    "agent": agent,
                    "destination": dest.name,
                    "reason": "the MCP filter did not read this request's body as a JSON-RPC "
                    "message, so it cannot be shown not to be a forbidden tool call",
                },
            ),
        )
        for headers in _has_body()
    ]
    return [deny_tool, *unparsed]


def _path_match(pattern: str) -> rc.RouteMatch:
    if pattern.endswith("*"):
        return rc.RouteMatch(prefix=pattern[:-1])
    return rc.RouteMatch(path=pattern)


RULE_KEY = "meshgate_rule"  # descriptor key naming an agent's rule: agent/destination/index


def rule_key(agent: str, dest: Destination, index: int) -> str:
    return f"{agent}/{dest.name}/{index}"


def rule_rate_limit(agent: str, index: int, dest: Destination) -> rc.RateLimit:
    """The action every route of a rule carries: its requests draw from the rule's bucket."""
    return rc.RateLimit(
        actions=[
            rc.RateLimit.Action(
                generic_key=rc.RateLimit.Action.GenericKey(
                    descriptor_key=RULE_KEY, descriptor_value=rule_key(agent, dest, index)
                )
            )
        ]
    )


def _bucket(requests: int, per_seconds: int) -> token_bucket_pb2.TokenBucket:
    """A full bucket of `requests`, refilled whole every `per_seconds`."""
    return token_bucket_pb2.TokenBucket(
        max_tokens=requests,
        tokens_per_fill=wrappers_pb2.UInt32Value(value=requests),
        fill_interval=duration_pb2.Duration(seconds=per_seconds),
    )


# The virtual host's default bucket, which requests of rules without a limit would draw from if
# Envoy consumed it; `always_consume_default_token_bucket` is off, and it is effectively endless.
UNLIMITED = 1 << 30


def rate_limit_config(
    dest: Destination, grants: tuple[Grant, ...]
) -> local_rate_limit_pb2.LocalRateLimit | None:
    """One bucket per rule with a rateLimit, for the destination's virtual host (None: none).

    Routes of a rule name its bucket (`rule_rate_limit`); routes of other rules name none and
    are never limited. 429s carry `retry-after` (the longest refill period among this host's
    rules: Envoy adds one set of headers per host) and `x-ratelimit-limit/-remaining/-reset`.
    """
    owned = {  # one bucket per owner: a sub-agent's rule draws from its parent's
        r.owner(a, i): r.rate_limit
        for a, i, r, _ in grants
        if r.rate_limit is not None and r.rate_limit.scope == "replica"
    }
    limited = [(a, i, limit) for (a, i), limit in owned.items()]
    if not limited:
        return None
    always = base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(
            numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED
        )
    )
    retry_after = max(limit.per_seconds for _, _, limit in limited)
    return local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=f"meshgate_rl.{dest.name}",
        token_bucket=_bucket(UNLIMITED, 1),
        filter_enabled=always,
        filter_enforced=always,
        always_consume_default_token_bucket=wrappers_pb2.BoolValue(value=False),
        enable_x_ratelimit_headers=ratelimit_pb2.DRAFT_VERSION_03,
        descriptors=[
            ratelimit_pb2.LocalRateLimitDescriptor(
                entries=[
                    ratelimit_pb2.RateLimitDescriptor.Entry(
                        key=RULE_KEY, value=rule_key(agent, dest, index)
                    )
                ],
                token_bucket=_bucket(limit.requests, limit.per_seconds),
            )
            for agent, index, limit in limited
        ],
        response_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="retry-after", value=str(retry_after)),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
    )

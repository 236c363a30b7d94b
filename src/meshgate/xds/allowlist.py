"""Per-agent allowlists as Envoy routes: one route per (agent, rule, path), then a refusal.

The agent's identity arrives in AGENT_HEADER, which the agent's sidecar sets and overwrites
(the identity issue replaces it with the verified client certificate). A rule's rate limit is a
token bucket on its own routes, so it is per agent, per rule, per gateway instance.
"""

from __future__ import annotations

import functools
import re

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from meshgate.policy.model import Destination, EgressRule, PolicyModel
from meshgate.xds.access_log import allow_route_name
from meshgate.xds.common import json_refusal, pack

AGENT_HEADER = "x-meshgate-agent"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"


Grant = tuple[str, int, EgressRule]  # (agent, index of the rule in its policy, rule)


def grants_by_destination(model: PolicyModel) -> dict[str, tuple[Grant, ...]]:
    """Every rule, grouped by the destination it names, in policy order."""
    grouped: dict[str, list[Grant]] = {d.name: [] for d in model.destinations}
    for agent in model.agents:
        for index, rule in enumerate(agent.rules):
            grouped.setdefault(rule.destination, []).append((agent.agent, index, rule))
    return {name: tuple(grants) for name, grants in grouped.items()}


def destination_routes(
    dest: Destination, cluster: str, grants: tuple[Grant, ...], trust_domain: str | None = None
) -> list[rc.Route]:
    """`trust_domain` set: agents are recognised by the SPIFFE ID the gateway took from their
    verified certificate; otherwise by the name their sidecar stamped."""
    routes: list[rc.Route] = []
    for agent, index, rule in grants:
        identity = f"spiffe://{trust_domain}/agent/{agent}" if trust_domain else agent
        routes.extend(rule_routes(agent, dest, index, rule, cluster, identity))
    tunnel_reason = (
        "no rule of this agent allows a tunnel to this host"
        if dest.tls == "passthrough"
        else f"tls: {dest.tls}: send plain HTTP through the proxy, not CONNECT"
    )
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
    return routes


@functools.lru_cache(maxsize=200_000)
def rule_routes(
    agent: str,
    dest: Destination,
    index: int,
    rule: EgressRule,
    cluster: str,
    identity: str,
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
    per_filter = {}
    if rule.rate_limit is not None:
        per_filter[RATE_LIMIT_FILTER] = pack(
            token_bucket_limit(
                f"{agent}.{dest.name}.{index}",
                rule.rate_limit.requests,
                rule.rate_limit.per_seconds,
            )
        )
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
                ),
                typed_per_filter_config=per_filter,
            ),
        )
    matches = [_path_match(p) for p in rule.paths] or [rc.RouteMatch(prefix="/")]
    if rule.tools:
        matches = [m for base in matches for m in _tool_matches(base, rule.tools)]
    routes = []
    for n, match in enumerate(matches):
        match.headers.extend(headers)
        routes.append(
            rc.Route(
                name=allow_route_name(agent, dest.name, index, n),
                match=match,
                route=rc.RouteAction(cluster=cluster),
                typed_per_filter_config=per_filter,
            )
        )
    return tuple(routes)


MCP_FILTER = "envoy.filters.http.mcp"


def _mcp_field(*path: str) -> list[metadata_pb2.MetadataMatcher.PathSegment]:
    return [metadata_pb2.MetadataMatcher.PathSegment(key=k) for k in path]


def _tool_matches(base: rc.RouteMatch, tools: tuple[str, ...]) -> list[rc.RouteMatch]:
    """MCP traffic other than tools/call, plus tools/call naming one of `tools`.

    The MCP filter parses the JSON-RPC body into dynamic metadata and re-selects the route.
    """
    tools_call = string_pb2.StringMatcher(exact="tools/call")
    not_a_call = rc.RouteMatch()
    not_a_call.CopyFrom(base)
    not_a_call.dynamic_metadata.append(
        metadata_pb2.MetadataMatcher(
            filter=MCP_FILTER,
            path=_mcp_field("method"),
            value=value_pb2.ValueMatcher(string_match=tools_call),
            invert=True,
        )
    )
    allowed_call = rc.RouteMatch()
    allowed_call.CopyFrom(base)
    names = "|".join(re.escape(t) for t in tools)
    allowed_call.dynamic_metadata.extend(
        [
            metadata_pb2.MetadataMatcher(
                filter=MCP_FILTER,
                path=_mcp_field("method"),
                value=value_pb2.ValueMatcher(string_match=tools_call),
            ),
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
    return [not_a_call, allowed_call]


def _path_match(pattern: str) -> rc.RouteMatch:
    if pattern.endswith("*"):
        return rc.RouteMatch(prefix=pattern[:-1])
    return rc.RouteMatch(path=pattern)


def token_bucket_limit(
    stat: str, requests: int, per_seconds: int
) -> local_rate_limit_pb2.LocalRateLimit:
    """A full bucket of `requests`, refilled whole every `per_seconds`; 429 with retry-after."""
    always = base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(
            numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED
        )
    )
    return local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=f"meshgate_rl.{stat}",
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=requests,
            tokens_per_fill=wrappers_pb2.UInt32Value(value=requests),
            fill_interval=duration_pb2.Duration(seconds=per_seconds),
        ),
        filter_enabled=always,
        filter_enforced=always,
        response_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="retry-after", value=str(per_seconds)),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
    )

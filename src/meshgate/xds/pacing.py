"""Policy model -> what the gateway asks of its pacer: global limits and paced routes. Pure.

Global rate limits are one small Lua filter: each limited route hands it the limit itself
(`spec.limits_query`, in the route's filter context), and it asks the pacer's HTTP endpoint
(`pacer.limits_http`), which decides from tokens leased from the shared store. Envoy's gRPC
rate-limit protocol would do the same at ~10x the pacer's CPU per request (docs/pacing.md).
Budgets, concurrency caps, LLM rules and MCP tool rules are one `ext_proc` filter, disabled
unless a route enables it with its PaceSpec. Both call the pacer beside the gateway, over unix
sockets that the gateway bootstrap names (spec.PACER_CLUSTER, spec.LIMITS_CLUSTER), so no
agent can reach it.
"""

from __future__ import annotations

import functools

from envoy.config.core.v3 import base_pb2, grpc_service_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2, struct_pb2

from meshgate.mcp import decision as mcp_decision
from meshgate.pacing.spec import (
    DYNAMIC_METADATA_NAMESPACE,
    LIMITS_CLUSTER,
    LIMITS_PATH,
    LIMITS_VERDICT_HEADER,
    PACE_METADATA,
    PACER_CLUSTER,
    STORE_UNAVAILABLE,
    BudgetSpec,
    ConcurrencySpec,
    GlobalLimit,
    LlmSpec,
    PaceSpec,
    encode,
    limits_query,
)
from meshgate.policy.model import AgentPolicy, Budget, Destination, EgressRule, Mesh, PolicyModel
from meshgate.xds.common import pack

GLOBAL_LIMITS_FILTER = "meshgate.global-limits"
LIMITS_SCRIPT = "meshgate-limits"
PACER_FILTER = "meshgate.pacer"
LIMITS_DETAILS = "lua_response"  # Envoy's response code details of the limits filter's refusals
LIMITS_TIMEOUT_MS = 1500  # the pacer answers within its store timeout; this only bounds a hung one
LIMITS_METADATA = "meshgate.limits"  # the x-ratelimit-* of an admitted request, for its response
NO_LIMITS_LUA = "function envoy_on_request(h) end\nfunction envoy_on_response(h) end\n"
# The pacer's answer decides (`pacer.limits_http`); without one (the pacer unreachable or
# silent) a route whose limits all fail open goes on, else it is refused with 503.
LIMITS_LUA = f"""
local COPY = {{"retry-after", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
  "content-type"}}

local function unavailable(h, agent)
  h:respond({{[":status"] = "503", ["retry-after"] = "1", ["content-type"] = "application/json"}},
    '{{"error":"{STORE_UNAVAILABLE}","agent":"' .. agent .. '","reason":"a global rate limit '
    .. 'that fails closed could not be checked: the pacer did not answer; retry shortly"}}')
end

local function check(h, q, closed, agent)
  local call = {{[":method"] = "GET", [":authority"] = "meshgate-pacer",
    [":path"] = "{LIMITS_PATH}?" .. q}}
  local headers, body = h:httpCall("{LIMITS_CLUSTER}", call, nil, {LIMITS_TIMEOUT_MS})
  local verdict = headers["{LIMITS_VERDICT_HEADER}"]
  if verdict == "ok" then
    local limit = headers["x-ratelimit-limit"]
    if limit ~= nil then
      local md = h:streamInfo():dynamicMetadata()
      md:set("{LIMITS_METADATA}", "x-ratelimit-limit", limit)
      md:set("{LIMITS_METADATA}", "x-ratelimit-remaining", headers["x-ratelimit-remaining"])
      md:set("{LIMITS_METADATA}", "x-ratelimit-reset", headers["x-ratelimit-reset"])
    end
    return
  end
  if verdict == nil then
    if closed then unavailable(h, agent) end
    return
  end
  local out = {{[":status"] = headers[":status"]}}
  for _, k in ipairs(COPY) do
    if headers[k] ~= nil then out[k] = headers[k] end
  end
  h:respond(out, body)
end

function envoy_on_request(h)
  -- the route's context, read before the call (handles do not outlive a yield)
  local ctx = h:filterContext()
  local q = ctx:get("limits")
  if q == nil then return end
  local closed = ctx:get("closed") == "1"
  local agent = ctx:get("agent") or ""
  local ok, err = pcall(check, h, q, closed, agent)
  if not ok then  -- a script error must not let a fail-closed limit pass
    h:logErr("meshgate global limits: " .. tostring(err))
    if closed then unavailable(h, agent) end
  end
end

function envoy_on_response(h)
  local md = h:streamInfo():dynamicMetadata():get("{LIMITS_METADATA}")
  if md == nil then return end
  for k, v in pairs(md) do h:headers():replace(k, v) end
end
"""
PACER_MESSAGE_TIMEOUT_MS = 2_000  # per ext_proc message; the pacer extends it while queueing
PACER_WAIT_MARGIN_MS = 5_000
MCP_FILTER_METADATA = "envoy.filters.http.mcp"  # the namespace Envoy's MCP filter writes


def global_limit(agent: str, dest: Destination, index: int, rule: EgressRule) -> GlobalLimit:
    assert rule.rate_limit is not None and rule.rate_limit.scope == "global"
    limit = rule.rate_limit
    owner, at = rule.owner(agent, index)
    return GlobalLimit(
        f"{owner}/{dest.name}/{at}", limit.requests, limit.per_seconds, limit.on_store_failure
    )


def global_limits_route_config(agent: str, limits: list[GlobalLimit]) -> any_pb2.Any:
    """What one route asks of the limits filter: its limits, and whether one fails closed
    (then the filter refuses when the pacer cannot be reached at all)."""
    context = struct_pb2.Struct()
    context.update(
        {
            "limits": limits_query(limits),
            "closed": "1" if any(lim.on_store_failure == "closed" for lim in limits) else "0",
            "agent": agent,
        }
    )
    return pack(lua_pb2.LuaPerRoute(name=LIMITS_SCRIPT, filter_context=context))


def _budget(budget_id: str, b: Budget) -> BudgetSpec:
    return BudgetSpec(budget_id, b.unit, b.limit, b.window, b.on_store_failure)


def budget_specs(
    policy: AgentPolicy, index: int, rule: EgressRule, dest: Destination
) -> list[BudgetSpec]:
    """The counters a request of `policy.agent` under rule `index` charges, in the order they
    are reserved: the rule's (its parent's rule, for a sub-agent), the agent's, its groups'.
    Token and cost budgets count LLM calls only. Shadow mode names the same counters."""
    agent = policy.agent

    def counts(b: Budget) -> bool:
        return b.unit == "requests" or dest.llm is not None

    owner, at = rule.owner(agent, index)
    budgets = [_budget(f"rule/{owner}/{at}/{b.name}", b) for b in rule.budgets]
    budgets += [_budget(f"agent/{agent}/{b.name}", b) for b in policy.budgets if counts(b)]
    budgets += [
        _budget(f"group/{g.group}/{g.budget.name}", g.budget)
        for g in policy.group_budgets
        if counts(g.budget)
    ]
    return budgets


def pace_spec(
    mesh: Mesh,
    policy: AgentPolicy,
    index: int,
    rule: EgressRule,
    dest: Destination,
    shadow: AgentPolicy | None = None,
) -> PaceSpec | None:
    """What the pacer enforces on requests of `policy.agent` under rule `index`; None: nothing
    (the route skips the pacer). Every call to an LLM destination is paced, if only to read its
    model and usage for the audit log. Token and cost budgets apply to LLM calls only. A rule
    with MCP tools hands the pacer all of the agent's rules for the destination (`mcp`): a call
    is allowed when any of them allows it, with its arguments. `shadow`: the agent's policy as
    shadow mode sees it (`policy.model.shadow_model`): its tool rules travel too when they
    differ (`shadow_mcp`), for the pacer to record what they would refuse."""
    agent = policy.agent
    llm = dest.llm
    budgets = budget_specs(policy, index, rule, dest)
    owner, at = rule.owner(agent, index)  # a sub-agent's rule counts in its parent's counters
    caps: list[ConcurrencySpec] = []
    if dest.tls == "passthrough":
        # the gateway sees a tunnel: the agent's and its groups' request budgets count it (the
        # policy allows no other limit here), and it holds no capacity slot, since a tunnel
        # may stay open for hours
        return PaceSpec(agent, dest.name, tuple(budgets)) if budgets else None
    if rule.concurrency is not None:  # the agent's own cap first: waiting on it is its own doing
        c = rule.concurrency
        caps.append(ConcurrencySpec(f"rule/{owner}/{dest.name}/{at}", c.max, c.max_wait_ms))
    if dest.concurrency is not None:
        c = dest.concurrency
        caps.append(ConcurrencySpec(f"destination/{dest.name}", c.max, c.max_wait_ms, fair=True))
    if mesh.gateway_capacity is not None:
        c = mesh.gateway_capacity
        caps.append(ConcurrencySpec("gateway", c.max, c.max_wait_ms, fair=True, capacity=True))
    llm_spec = None
    if llm is not None:
        llm_spec = LlmSpec(llm.api, rule.models, rule.max_tokens, llm.prices)
    mcp = mcp_policy(policy, dest.name) if rule.tools else None
    if not budgets and not caps and llm_spec is None and mcp is None:
        return None  # never paced only for shadow mode: a pacer outage must not refuse it
    shadow_mcp = None
    if shadow is not None and any(r.tools for r in shadow.rules if r.destination == dest.name):
        candidate = mcp_policy(shadow, dest.name)
        shadow_mcp = candidate if candidate != mcp else None
    return PaceSpec(agent, dest.name, tuple(budgets), tuple(caps), llm_spec, mcp, False, shadow_mcp)


@functools.lru_cache(maxsize=10_000)
def mcp_policy(policy: AgentPolicy, destination: str) -> str:
    """The agent's tool rules for `destination`, as the pacer reads them (memoised: every
    route of every tool rule carries the same text)."""
    return mcp_decision.encode(mcp_decision.tool_policy(policy, destination))


def pacer_route_config(spec: PaceSpec) -> any_pb2.Any:
    """Turns the pacer on for one route, handing it the route's PaceSpec."""
    per_route = ext_proc_pb2.ExtProcPerRoute(
        overrides=ext_proc_pb2.ExtProcOverrides(
            grpc_initial_metadata=[base_pb2.HeaderValue(key=PACE_METADATA, value=encode(spec))]
        )
    )
    return pack(rc.FilterConfig(config=pack(per_route)))


@functools.lru_cache(maxsize=1)
def pacer_skip_config() -> any_pb2.Any:
    """Creates the pacer filter for a request whose final route may need it, and skips it on
    this route (see allowlist._pacer_off)."""
    per_route = ext_proc_pb2.ExtProcPerRoute(disabled=True)
    return pack(rc.FilterConfig(config=pack(per_route)))


def _pacer_service(timeout_ms: int) -> grpc_service_pb2.GrpcService:
    return grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=PACER_CLUSTER),
        timeout=_ms(timeout_ms),
    )


def _ms(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def global_limit_filters(model: PolicyModel) -> list[hcm_pb2.HttpFilter]:
    """The limits filter, when the policy has any global limit. On for every request: a
    route without limits returns at once (a filter off by default would not be created for a
    tool route chosen after Envoy's MCP filter read the body)."""
    if not any(
        r.rate_limit is not None and r.rate_limit.scope == "global" and r.enforced
        for a in model.agents
        for r in a.rules
    ):
        return []
    return [hcm_pb2.HttpFilter(name=GLOBAL_LIMITS_FILTER, typed_config=_limits_filter_config())]


@functools.lru_cache(maxsize=1)
def _limits_filter_config() -> any_pb2.Any:
    script = base_pb2.DataSource(inline_string=LIMITS_LUA)
    return pack(
        lua_pb2.Lua(
            source_codes={LIMITS_SCRIPT: script},
            default_source_code=base_pb2.DataSource(inline_string=NO_LIMITS_LUA),
            stat_prefix="meshgate_limits",
        )
    )


def pacer_filter(max_wait_ms: int) -> hcm_pb2.HttpFilter:
    """The ext_proc filter, off unless a route turns it on (`pacer_route_config`).

    Fails closed: if the pacer cannot be reached a paced request is refused, since its budget
    could not be reserved. Headers only by default; the pacer asks for bodies of LLM calls.
    `max_wait_ms`: the longest queue wait any route allows (the pacer extends the message
    timeout up to this, plus a margin, while a request waits)."""
    mode = processing_mode_pb2.ProcessingMode
    config = ext_proc_pb2.ExternalProcessor(
        grpc_service=_pacer_service(max_wait_ms + PACER_WAIT_MARGIN_MS),
        failure_mode_allow=False,
        processing_mode=mode(
            request_header_mode=mode.SEND,
            response_header_mode=mode.SEND,
            request_body_mode=mode.NONE,
            response_body_mode=mode.NONE,
            request_trailer_mode=mode.SKIP,
            response_trailer_mode=mode.SKIP,
        ),
        allow_mode_override=True,
        message_timeout=_ms(PACER_MESSAGE_TIMEOUT_MS),
        max_message_timeout=_ms(max_wait_ms + PACER_WAIT_MARGIN_MS),
        stat_prefix="meshgate_pacer",
        # without it Envoy drops the pacer's dynamic metadata (model, tokens, cost, budget)
        metadata_options=ext_proc_pb2.MetadataOptions(
            receiving_namespaces=ext_proc_pb2.MetadataOptions.MetadataNamespaces(
                untyped=[DYNAMIC_METADATA_NAMESPACE]
            ),
            # what Envoy's MCP filter read, so the pacer knows a tools/list at the request's
            # headers (its answer's body must be asked for then); the pacer's own strict
            # reading of the body decides everything else
            forwarding_namespaces=ext_proc_pb2.MetadataOptions.MetadataNamespaces(
                untyped=[MCP_FILTER_METADATA]
            ),
        ),
    )
    return hcm_pb2.HttpFilter(name=PACER_FILTER, typed_config=pack(config), disabled=True)


def longest_wait_ms(model: PolicyModel) -> int:
    waits = [d.concurrency.max_wait_ms for d in model.destinations if d.concurrency]
    waits += [
        r.concurrency.max_wait_ms
        for a in model.agents
        for r in a.rules
        if r.concurrency and r.enforced
    ]
    if model.mesh.gateway_capacity is not None:
        waits.append(model.mesh.gateway_capacity.max_wait_ms)
    return sum(sorted(waits)[-3:])  # a request waits on at most three caps in turn

"""Policy model -> what the gateway asks of its pacer: global limits and paced routes. Pure.

Global rate limits are Envoy `ratelimit` filters (one that fails open, one that fails closed:
Envoy's failure mode is per filter) whose descriptors carry the whole limit (pacing.spec), and
budgets, concurrency caps, LLM rules and MCP tool rules are one `ext_proc` filter, disabled
unless a route enables it with its PaceSpec. Both call the pacer beside the gateway, over a unix
socket that the gateway bootstrap names (spec.PACER_CLUSTER), so no agent can reach it.
"""

from __future__ import annotations

import functools

from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2
from envoy.config.ratelimit.v3 import rls_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import http_status_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from meshgate.mcp import decision as mcp_decision
from meshgate.pacing.spec import (
    DYNAMIC_METADATA_NAMESPACE,
    PACE_METADATA,
    PACER_CLUSTER,
    RLS_DOMAIN,
    BudgetSpec,
    ConcurrencySpec,
    GlobalLimit,
    LlmSpec,
    PaceSpec,
    descriptor_entries,
    encode,
)
from meshgate.policy.model import AgentPolicy, Budget, Destination, EgressRule, Mesh, PolicyModel
from meshgate.xds.common import pack

GLOBAL_LIMIT_OPEN = "meshgate.global-limit-open"
GLOBAL_LIMIT_CLOSED = "meshgate.global-limit-closed"
PACER_FILTER = "meshgate.pacer"
# rate-limit stages: Envoy's local limiter reads stage 0, so global limits use their own
STAGE_OPEN = 1
STAGE_CLOSED = 2
RLS_ERROR_DETAILS = "rate_limiter_error"  # Envoy's details when a fail-closed limit's call failed
RLS_TIMEOUT_MS = 1500  # the pacer answers within its store timeout; this only bounds a hung pacer
PACER_MESSAGE_TIMEOUT_MS = 2_000  # per ext_proc message; the pacer extends it while queueing
PACER_WAIT_MARGIN_MS = 5_000
MCP_FILTER_METADATA = "envoy.filters.http.mcp"  # the namespace Envoy's MCP filter writes


def global_limit(agent: str, dest: Destination, index: int, rule: EgressRule) -> GlobalLimit:
    assert rule.rate_limit is not None and rule.rate_limit.scope == "global"
    limit = rule.rate_limit
    return GlobalLimit(
        f"{agent}/{dest.name}/{index}", limit.requests, limit.per_seconds, limit.on_store_failure
    )


def global_rate_limit(limit: GlobalLimit) -> rc.RateLimit:
    """The route action whose descriptor is the whole limit: the pacer needs no policy."""
    return rc.RateLimit(
        stage=wrappers_pb2.UInt32Value(
            value=STAGE_OPEN if limit.on_store_failure == "open" else STAGE_CLOSED
        ),
        actions=[
            rc.RateLimit.Action(
                generic_key=rc.RateLimit.Action.GenericKey(descriptor_key=k, descriptor_value=v)
            )
            for k, v in descriptor_entries(limit)
        ],
    )


def _budget(budget_id: str, b: Budget) -> BudgetSpec:
    return BudgetSpec(budget_id, b.unit, b.limit, b.window, b.on_store_failure)


def pace_spec(
    mesh: Mesh, policy: AgentPolicy, index: int, rule: EgressRule, dest: Destination
) -> PaceSpec | None:
    """What the pacer enforces on requests of `policy.agent` under rule `index`; None: nothing
    (the route skips the pacer). Every call to an LLM destination is paced, if only to read its
    model and usage for the audit log. Token and cost budgets apply to LLM calls only. A rule
    with MCP tools hands the pacer all of the agent's rules for the destination (`mcp`): a call
    is allowed when any of them allows it, with its arguments."""
    agent = policy.agent
    llm = dest.llm

    def counts(b: Budget) -> bool:
        return b.unit == "requests" or llm is not None

    budgets = [_budget(f"rule/{agent}/{index}/{b.name}", b) for b in rule.budgets]
    budgets += [_budget(f"agent/{agent}/{b.name}", b) for b in policy.budgets if counts(b)]
    budgets += [
        _budget(f"group/{g.group}/{g.budget.name}", g.budget)
        for g in policy.group_budgets
        if counts(g.budget)
    ]
    caps: list[ConcurrencySpec] = []
    if rule.concurrency is not None:  # the agent's own cap first: waiting on it is its own doing
        c = rule.concurrency
        caps.append(ConcurrencySpec(f"rule/{agent}/{dest.name}/{index}", c.max, c.max_wait_ms))
    if dest.concurrency is not None:
        c = dest.concurrency
        caps.append(ConcurrencySpec(f"destination/{dest.name}", c.max, c.max_wait_ms, fair=True))
    if mesh.gateway_capacity is not None:
        c = mesh.gateway_capacity
        caps.append(ConcurrencySpec("gateway", c.max, c.max_wait_ms, fair=True, capacity=True))
    llm_spec = None
    if llm is not None:
        llm_spec = LlmSpec(llm.api, rule.models, rule.max_tokens, llm.prices)
    mcp = mcp_policy(policy, dest.name) if rule.tools and dest.tls != "passthrough" else None
    if not budgets and not caps and llm_spec is None and mcp is None:
        return None
    return PaceSpec(agent, dest.name, tuple(budgets), tuple(caps), llm_spec, mcp)


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
    """The ratelimit filters the policy's global limits need (none without any): limits that
    fail open first, so a request refused by a closed one has not spent an open one's token."""
    modes = {
        r.rate_limit.on_store_failure
        for a in model.agents
        for r in a.rules
        if r.rate_limit is not None and r.rate_limit.scope == "global"
    }
    out = []
    for mode, name, stage in (
        ("open", GLOBAL_LIMIT_OPEN, STAGE_OPEN),
        ("closed", GLOBAL_LIMIT_CLOSED, STAGE_CLOSED),
    ):
        if mode not in modes:
            continue
        config = rate_limit_pb2.RateLimit(
            domain=RLS_DOMAIN,
            stage=stage,
            timeout=_ms(RLS_TIMEOUT_MS),
            failure_mode_deny=mode == "closed",
            # the store did not answer a fail-closed limit: unavailable, not "over the limit"
            status_on_error=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
            enable_x_ratelimit_headers=ratelimit_pb2.DRAFT_VERSION_03,
            rate_limit_service=rls_pb2.RateLimitServiceConfig(
                grpc_service=_pacer_service(RLS_TIMEOUT_MS),
                transport_api_version=config_source_pb2.V3,
            ),
            stat_prefix=name,
        )
        out.append(hcm_pb2.HttpFilter(name=name, typed_config=pack(config)))
    return out


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
    waits += [r.concurrency.max_wait_ms for a in model.agents for r in a.rules if r.concurrency]
    if model.mesh.gateway_capacity is not None:
        waits.append(model.mesh.gateway_capacity.max_wait_ms)
    return sum(sorted(waits)[-3:])  # a request waits on at most three caps in turn

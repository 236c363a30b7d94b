"""Issue 19's translation: global limits carried whole by their routes, paced routes carrying
their PaceSpec to the pacer, and the filter order (checked on the generated Envoy config)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from builders import model
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from meshgate.pacing import spec
from meshgate.policy.model import (
    AgentPolicy,
    Budget,
    Concurrency,
    Destination,
    EgressRule,
    GroupBudget,
    Llm,
    Mesh,
    PolicyModel,
    Price,
    RateLimit,
)
from meshgate.sidecar.bootstrap import limits_cluster, pacer_cluster
from meshgate.xds.gateway import egress_routes, gateway_resources
from meshgate.xds.options import TranslateOptions
from meshgate.xds.pacing import GLOBAL_LIMITS_FILTER, LIMITS_SCRIPT, PACER_FILTER

DOCS = Destination("docs", "docs.internal", 80, tls="none", address=("127.0.0.1", 9001))
OPENAI = Destination(
    "openai",
    "api.openai.com",
    443,
    llm=Llm("openai", (Price("gpt-4o*", "2.5", "10"),)),
    concurrency=Concurrency(8, 30_000),
)
DAILY = Budget("daily", "requests", 100, "day")
TOKENS = Budget("tokens", "tokens", 10_000, "hour")


def policy(mesh: Mesh | None = None) -> PolicyModel:
    coder = AgentPolicy(
        "coder",
        "coder",
        (
            EgressRule("docs", rate_limit=RateLimit(600, 60, "global", "closed")),
            EgressRule(
                "openai",
                rate_limit=RateLimit(10, 1, "global", "open"),
                concurrency=Concurrency(2, 500),
                models=("gpt-4o-mini",),
                max_tokens=512,
                budgets=(TOKENS,),
            ),
        ),
        budgets=(DAILY,),
        group_budgets=(GroupBudget("team", Budget("spend", "cost_micro_usd", 5, "month")),),
    )
    plain = AgentPolicy("plain", "plain", (EgressRule("docs", rate_limit=RateLimit(3, 60)),))
    return dataclasses.replace(
        model(destinations=(DOCS, OPENAI), agents=(coder, plain)), mesh=mesh or Mesh()
    )


def routes_named(table: object, prefix: str) -> list[rc.Route]:
    assert hasattr(table, "virtual_hosts")
    return [r for vh in table.virtual_hosts for r in vh.routes if r.name.startswith(prefix)]


def pace_of(route: rc.Route) -> spec.PaceSpec | None:
    if PACER_FILTER not in route.typed_per_filter_config:
        return None
    config = rc.FilterConfig()
    route.typed_per_filter_config[PACER_FILTER].Unpack(config)
    assert not config.disabled
    per_route = ext_proc_pb2.ExtProcPerRoute()
    config.config.Unpack(per_route)
    [metadata] = per_route.overrides.grpc_initial_metadata
    assert metadata.key == spec.PACE_METADATA
    return spec.decode(metadata.value)


def limits_context(route: rc.Route) -> dict[str, str]:
    per_route = lua_pb2.LuaPerRoute()
    route.typed_per_filter_config[GLOBAL_LIMITS_FILTER].Unpack(per_route)
    assert per_route.name == LIMITS_SCRIPT
    return {k: v.string_value for k, v in per_route.filter_context.fields.items()}


def test_global_limits_are_route_contexts_that_carry_the_whole_limit() -> None:
    table = egress_routes(policy(), {})
    [docs] = routes_named(table, "allow/coder/docs/")
    assert not docs.route.rate_limits
    context = limits_context(docs)
    assert spec.parse_limits_query(context["limits"]) == [
        spec.GlobalLimit("coder/docs/0", 600, 60, "closed")
    ]
    assert (context["closed"], context["agent"]) == ("1", "coder")
    [openai] = routes_named(table, "allow/coder/openai/")
    assert limits_context(openai)["closed"] == "0"  # fails open without the pacer
    # a replica-scoped limit stays in Envoy's local limiter (no pacer call)
    [plain] = routes_named(table, "allow/plain/docs/")
    assert GLOBAL_LIMITS_FILTER not in plain.typed_per_filter_config
    assert plain.route.rate_limits[0].actions[0].generic_key.descriptor_key == "meshgate_rule"


def test_limits_queries_round_trip() -> None:
    limits = [spec.GlobalLimit("a/d/0", 5, 60, "open"), spec.GlobalLimit("a&b=c/d/1", 1, 1)]
    assert spec.parse_limits_query(spec.limits_query(limits)) == limits


def test_paced_routes_hand_the_pacer_everything_it_enforces() -> None:
    table = egress_routes(policy(Mesh(gateway_capacity=Concurrency(100, 10_000))), {})
    [openai] = routes_named(table, "allow/coder/openai/")
    pace = pace_of(openai)
    assert pace is not None and pace.agent == "coder" and pace.destination == "openai"
    assert [(b.id, b.unit, b.limit) for b in pace.budgets] == [
        ("rule/coder/1/tokens", "tokens", 10_000),
        ("agent/coder/daily", "requests", 100),
        ("group/team/spend", "cost_micro_usd", 5),
    ]
    assert [(c.key, c.max, c.max_wait_ms, c.fair, c.capacity) for c in pace.concurrency] == [
        ("rule/coder/openai/1", 2, 500, False, False),
        ("destination/openai", 8, 30_000, True, False),
        ("gateway", 100, 10_000, True, True),
    ]
    assert pace.llm == spec.LlmSpec(
        "openai", ("gpt-4o-mini",), 512, (spec.Price("gpt-4o*", "2.5", "10"),)
    )
    # non-LLM routes: token and cost budgets never apply; request budgets and capacity do
    [docs] = routes_named(table, "allow/coder/docs/")
    docs_pace = pace_of(docs)
    assert docs_pace is not None and docs_pace.llm is None
    assert [b.id for b in docs_pace.budgets] == ["agent/coder/daily"]
    assert [c.key for c in docs_pace.concurrency] == ["gateway"]
    # an agent with nothing to pace (and no capacity cap) never reaches the pacer
    [plain] = routes_named(egress_routes(policy(), {}), "allow/plain/docs/")
    assert pace_of(plain) is None


def test_a_tunnel_counts_in_request_budgets_and_holds_no_capacity_slot() -> None:
    vault = Destination("vault", "vault.example", 443, tls="passthrough")
    base = policy(Mesh(gateway_capacity=Concurrency(100, 10_000)))
    coder = dataclasses.replace(base.agents[0], rules=(*base.agents[0].rules, EgressRule("vault")))
    plain = dataclasses.replace(base.agents[1], rules=(EgressRule("vault"),))
    table = egress_routes(
        dataclasses.replace(base, destinations=(*base.destinations, vault), agents=(coder, plain)),
        {},
    )
    [tunnel] = routes_named(table, "allow/coder/vault/")
    assert tunnel.match.HasField("connect_matcher")
    pace = pace_of(tunnel)
    assert pace is not None
    assert [b.id for b in pace.budgets] == ["agent/coder/daily"]  # request budgets only
    assert pace.concurrency == () and pace.llm is None and pace.mcp is None
    # no budget to count it in: the tunnel never reaches the pacer
    [free] = routes_named(table, "allow/plain/vault/")
    assert pace_of(free) is None


def test_filters_run_in_order_and_the_pacer_fails_closed() -> None:
    resources = gateway_resources(policy(), TranslateOptions())
    [listener] = [r for r in resources if isinstance(r, listener_pb2.Listener)]
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    names = [f.name for f in hcm.http_filters]
    local = names.index("envoy.filters.http.local_ratelimit")
    assert local < names.index(GLOBAL_LIMITS_FILTER) < names.index(PACER_FILTER) < len(names) - 1
    by_name = {f.name: f for f in hcm.http_filters}
    lua = lua_pb2.Lua()
    by_name[GLOBAL_LIMITS_FILTER].typed_config.Unpack(lua)
    assert spec.LIMITS_CLUSTER in lua.source_codes[LIMITS_SCRIPT].inline_string
    assert not by_name[GLOBAL_LIMITS_FILTER].disabled  # tool routes are chosen after the body
    pacer = ext_proc_pb2.ExternalProcessor()
    by_name[PACER_FILTER].typed_config.Unpack(pacer)
    assert by_name[PACER_FILTER].disabled  # on only where a route turns it on
    assert not pacer.failure_mode_allow
    assert pacer.grpc_service.envoy_grpc.cluster_name == spec.PACER_CLUSTER
    # waits up to the longest queue a route allows (30 s + 0.5 s) are not cut by Envoy
    assert pacer.max_message_timeout.seconds >= 30


def test_a_policy_without_pacing_adds_no_filters() -> None:
    plain = model(destinations=(DOCS,), agents=(AgentPolicy("p", "p", (EgressRule("docs"),)),))
    [listener] = [
        r
        for r in gateway_resources(plain, TranslateOptions())
        if isinstance(r, listener_pb2.Listener)
    ]
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    names = {f.name for f in hcm.http_filters}
    assert not names & {GLOBAL_LIMITS_FILTER, PACER_FILTER}


def test_envoy_accepts_the_paced_gateway_config(tmp_path: Path) -> None:
    """Envoy 1.40 itself (`--mode validate`) loads the listener and routes with the pacer's
    filters, given the bootstrap cluster to the pacer's socket."""
    resources = gateway_resources(
        policy(Mesh(gateway_capacity=Concurrency(100, 10_000))), TranslateOptions()
    )
    [listener] = [r for r in resources if isinstance(r, listener_pb2.Listener)]
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    hcm.route_config.CopyFrom(egress_routes(policy(), {}))  # inline instead of RDS
    listener.filter_chains[0].filters[0].typed_config.Pack(hcm)
    listener.address.socket_address.port_value = 0
    clusters = [r for r in resources if isinstance(r, cluster_pb2.Cluster)]
    for c in clusters:  # no xDS here: EDS clusters become static
        if c.type == cluster_pb2.Cluster.EDS:
            c.type = cluster_pb2.Cluster.STATIC
            c.ClearField("eds_cluster_config")
            c.load_assignment.cluster_name = c.name
    config = bootstrap_pb2.Bootstrap(
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            listeners=[listener],
            clusters=[
                *clusters,
                pacer_cluster(tmp_path / "pacer.sock"),
                limits_cluster(tmp_path / spec.LIMITS_SOCKET),
            ],
        )
    )
    path = tmp_path / "envoy.json"
    path.write_text(json_format.MessageToJson(config))
    done = subprocess.run(
        ["envoy", "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        cwd=tmp_path,  # the listener's audit spool path is relative: not into the checkout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

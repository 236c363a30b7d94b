"""The sidecar's HTTPS interception in its snapshot: which CONNECTs it opens, where their bytes
go, which certificates it holds; and the issuer that makes them."""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path

from builders import model
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf import any_pb2

from meshgate.controlplane.identity import IdentityIssuer
from meshgate.policy.model import AgentPolicy, Destination, EgressRule, PolicyModel
from meshgate.sidecar.bootstrap import BootstrapSpec, ProxyBinding, build_bootstrap
from meshgate.xds import types
from meshgate.xds.build import build_snapshots
from meshgate.xds.sidecar import (
    INTERCEPT_CLUSTER,
    INTERCEPT_LISTENER,
    INTERNAL_LISTENER_EXTENSION,
    route_name,
)
from meshgate.xds.snapshot import Snapshot

DESTS = (
    Destination("openai", "api.openai.com", 443),
    Destination("tools", "*.tools.example", 443),
    Destination("pinned", "pinned.example", 443, intercept=False),
    Destination("vault", "vault.example", 443, tls="passthrough"),
    Destination("plain", "plain.internal", 80, tls="none"),
)


def policy() -> PolicyModel:
    agents = (AgentPolicy("researcher", "researcher", (EgressRule("openai"),)),)
    return model(destinations=DESTS, agents=agents)


def unpack(snap: Snapshot, type_url: str, name: str, message: type) -> object:  # type: ignore[type-arg]
    packed = any_pb2.Any()
    packed.ParseFromString(snap.of_type(type_url)[name].any_bytes)
    out = message()
    packed.Unpack(out)
    return out


def connect_routes(routes: route_pb2.RouteConfiguration) -> list[tuple[str, str, str]]:
    """(authority regex or "*", cluster, upgrade) of every CONNECT route, in order."""
    out = []
    for route in routes.virtual_hosts[0].routes:
        if route.match.HasField("connect_matcher"):
            regex = (
                route.match.headers[0].string_match.safe_regex.regex if route.match.headers else "*"
            )
            terminated = route.route.upgrade_configs[0].HasField("connect_config")
            out.append((regex, route.route.cluster, "opened" if terminated else "forwarded"))
    return out


def test_only_intercepted_destinations_are_opened_and_the_rest_forwarded(tmp_path: Path) -> None:
    m = policy()
    ids = IdentityIssuer(tmp_path).identities(m)
    assert sorted(ids.intercept) == ["*.tools.example", "api.openai.com"]
    snap = build_snapshots(m, identities=ids)["agent/researcher"]
    routes = unpack(snap, types.ROUTE, route_name("researcher"), route_pb2.RouteConfiguration)
    assert isinstance(routes, route_pb2.RouteConfiguration)
    found = connect_routes(routes)
    assert found[-1] == ("*", "meshgate-gateway", "forwarded")
    opened = found[:-1]
    assert [(c, u) for _, c, u in opened] == [(INTERCEPT_CLUSTER, "opened")] * 2
    # the patterns Envoy's RE2 gets are plain enough for Python's re to check them
    patterns = [re.compile(r) for r, _, _ in opened]

    def opens(authority: str) -> bool:
        return any(p.fullmatch(authority) for p in patterns)

    assert opens("api.openai.com:443") and opens("API.OpenAI.com:443")
    assert opens("search.tools.example:443")
    for other in (
        "api.openai.com:8443",  # another port: not that destination
        "api.openai.com.evil:443",
        "xapi.openai.com:443",
        "a.b.tools.example:443",  # a wildcard is one label
        "pinned.example:443",  # opted out
        "vault.example:443",  # passthrough
        "evil.example:443",
    ):
        assert not opens(other), other


def test_the_intercept_listener_terminates_tls_per_host_and_routes_like_the_proxy(
    tmp_path: Path,
) -> None:
    m = policy()
    ids = IdentityIssuer(tmp_path).identities(m)
    snap = build_snapshots(m, identities=ids)["agent/researcher"]
    listener = unpack(snap, types.LISTENER, INTERCEPT_LISTENER, listener_pb2.Listener)
    assert isinstance(listener, listener_pb2.Listener)
    assert listener.HasField("internal_listener") and not listener.HasField("address")
    names = [list(c.filter_chain_match.server_names) for c in listener.filter_chains]
    assert names == [["*.tools.example"], ["api.openai.com"]]
    for chain in listener.filter_chains:
        tls = tls_pb2.DownstreamTlsContext()
        chain.transport_socket.typed_config.Unpack(tls)
        assert list(tls.common_tls_context.alpn_protocols) == ["h2", "http/1.1"]
        (sds,) = tls.common_tls_context.tls_certificate_sds_secret_configs
        assert sds.name == "meshgate-intercept/" + chain.filter_chain_match.server_names[0]
        hcm = hcm_pb2.HttpConnectionManager()
        chain.filters[0].typed_config.Unpack(hcm)
        assert hcm.rds.route_config_name == route_name("researcher")  # the agent's own routes
        assert not hcm.upgrade_configs  # no CONNECT inside an opened tunnel
    cluster = unpack(snap, types.CLUSTER, INTERCEPT_CLUSTER, cluster_pb2.Cluster)
    assert isinstance(cluster, cluster_pb2.Cluster)
    endpoint = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint
    assert endpoint.address.envoy_internal_address.server_listener_name == INTERCEPT_LISTENER
    # each leaf's key is in the agents' SDS, never in the gateway's
    secret = unpack(snap, types.SECRET, "meshgate-intercept/api.openai.com", secret_pb2.Secret)
    assert isinstance(secret, secret_pb2.Secret)
    key = ids.intercept["api.openai.com"].key_pem
    assert secret.tls_certificate.private_key.inline_bytes == key
    gateway = build_snapshots(m, identities=ids)["gateway"]
    assert key not in b"".join(r.any_bytes for t in gateway.resources.values() for r in t.values())


def test_without_mtls_nothing_is_intercepted() -> None:
    snap = build_snapshots(policy())["agent/researcher"]
    assert INTERCEPT_LISTENER not in snap.of_type(types.LISTENER)
    assert INTERCEPT_CLUSTER not in snap.of_type(types.CLUSTER)
    routes = unpack(snap, types.ROUTE, route_name("researcher"), route_pb2.RouteConfiguration)
    assert isinstance(routes, route_pb2.RouteConfiguration)
    assert connect_routes(routes) == [("*", "meshgate-gateway", "forwarded")]


def test_leaves_renew_in_their_window_and_go_with_their_destination(tmp_path: Path) -> None:
    m = policy()
    steady = IdentityIssuer(tmp_path / "a")
    leaves = steady.identities(m).intercept
    assert steady.identities(m).intercept == leaves
    lifetime = leaves["api.openai.com"].not_after - leaves["api.openai.com"].not_before
    assert lifetime == dt.timedelta(hours=24, minutes=1)  # a day, backdated a minute
    # 61 s leaves are backdated 60 s: their renewal point (half) comes ~0.5 s after issue
    quick = IdentityIssuer(
        tmp_path / "b", renew_window=(0.5, 0.5), host_cert_ttl=dt.timedelta(seconds=61)
    )
    first = quick.identities(m).intercept["api.openai.com"]
    time.sleep(1.0)
    second = quick.identities(m).intercept["api.openai.com"]
    assert first.chain_pem != second.chain_pem
    fewer = model(destinations=DESTS[2:], agents=(AgentPolicy("r", "r", (EgressRule("plain"),)),))
    assert quick.identities(fewer).intercept == {}


def test_sidecar_bootstraps_enable_internal_listeners() -> None:
    spec = BootstrapSpec(
        "agent/researcher/x", "meshgate-agent", "127.0.0.1", 1, "/tmp/a.sock",
        proxy=ProxyBinding("researcher"),
    )  # fmt: skip
    names = [e.name for e in build_bootstrap(spec).bootstrap_extensions]
    assert names == [INTERNAL_LISTENER_EXTENSION]

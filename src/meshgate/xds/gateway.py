"""Policy model -> the egress gateway's Envoy resources. Pure: no I/O, stable order."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.mcp.v3 import mcp_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from meshgate.policy.model import Destination, PolicyModel
from meshgate.xds.access_log import (
    audit_connection_manager,
    policy_version_header,
)
from meshgate.xds.allowlist import (
    AGENT_HEADER,
    MCP_FILTER,
    RATE_LIMIT_FILTER,
    Grant,
    destination_routes,
    grants_by_destination,
)
from meshgate.xds.common import (
    ads,
    connect_upgrade,
    http_listener,
    json_body,
    json_refusal,
    only_for_authorities,
    pack,
    router_filter,
    single_endpoint,
    socket_address,
)
from meshgate.xds.credentials import (
    credential_secret,
    has_credential,
    injector_filter,
)
from meshgate.xds.mtls import NodeIdentity, gateway_tls, identity_from_certificate, identity_secrets
from meshgate.xds.options import TranslateOptions
from meshgate.xds.snapshot import Encoded
from meshgate.xds.tool_identity import ToolTokens, tool_identity_resources
from meshgate.xds.wire import length_delimited, string_field

LISTENER_NAME = "egress-http"
ROUTE_NAME = "egress-routes"


def cluster_name(destination: Destination) -> str:
    return f"dest-{destination.name}"


# Instances of Consul-backed destinations, by destination name (a runtime input, like secrets).
Endpoints = Mapping[str, Sequence[tuple[str, int]]]


def gateway_resources(
    model: PolicyModel,
    options: TranslateOptions,
    secrets: Mapping[str, str] | None = None,
    identity: NodeIdentity | None = None,
    tool_tokens: ToolTokens | None = None,
    endpoints: Endpoints | None = None,
) -> list[Message | Encoded]:
    """Every resource a gateway needs, in a stable order. `secrets`: credential values by name;
    `identity`: the gateway's certificate, which turns on mTLS with agents' sidecars;
    `tool_tokens`: JWTs for `identity: jwt` destinations (only with mTLS: they vouch for the
    certificate's SPIFFE ID, never for a header an agent set);
    `endpoints`: current instances of `consul` destinations (none known: an empty assignment)."""
    secrets = secrets or {}
    trust_domain = model.mesh.trust_domain if identity is not None else None
    out: list[Message | Encoded] = []
    for dest in model.destinations:
        out.append(destination_cluster(dest, options.system_ca_file))
        if dest.address is not None:
            out.append(destination_endpoints(dest))
        elif dest.consul is not None:  # consul: only this assignment changes with the catalogue
            out.append(instance_endpoints(dest, (endpoints or {}).get(dest.name, ())))
    injecting = [d for d in model.destinations if has_credential(d, secrets)]
    # MCP parsing first: it re-selects the route the rate limiter and injectors then use
    filters = [rate_limit_filter(), *([injector_filter(injecting)] if injecting else [])]
    tool_identity, tool_secrets = (
        tool_identity_resources(model, tool_tokens) if identity and tool_tokens else (None, [])
    )
    if tool_identity is not None:
        filters.append(tool_identity)
    tool_hosts = _tool_rule_authorities(model)
    if tool_hosts:
        mcp = mcp_pb2.Mcp(clear_route_cache=True)
        filters.insert(0, only_for_authorities(MCP_FILTER, pack(mcp), tool_hosts))
    listener = egress_listener(model.mesh.gateway_listen_port, options.gateway_bind, filters)
    if identity is not None:
        require_agent_certificates(listener)
        out.extend(identity_secrets(identity, f"spiffe://{model.mesh.trust_domain}/agent/"))
    out.append(listener)
    out.append(egress_routes_encoded(model, secrets, trust_domain))
    for dest in injecting:
        assert dest.credentials is not None
        out.append(credential_secret(dest, secrets[dest.credentials.secret]))
    out.extend(tool_secrets)
    return out


def require_agent_certificates(listener: listener_pb2.Listener) -> None:
    """mTLS on the gateway listener; the agent header is rewritten from the client certificate."""
    chain = listener.filter_chains[0]
    chain.transport_socket.name = "envoy.transport_sockets.tls"
    chain.transport_socket.typed_config.CopyFrom(pack(gateway_tls()))
    hcm = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(hcm)
    hcm.early_header_mutation_extensions.append(identity_from_certificate(AGENT_HEADER))
    # the agent header is stripped before upstream; the certificate still names the caller
    hcm.local_reply_config.CopyFrom(refusal_bodies("%DOWNSTREAM_PEER_URI_SAN%"))
    chain.filters[0].typed_config.CopyFrom(pack(hcm))


def _tool_rule_authorities(model: PolicyModel) -> tuple[str, ...]:
    """Authorities of destinations with MCP tool rules: only their bodies are parsed."""
    names = {r.destination for a in model.agents for r in a.rules if r.tools}
    return tuple(
        authority
        for d in model.destinations
        if d.name in names
        for authority in (d.host, f"{d.host}:{d.port}")
    )


def destination_cluster(dest: Destination, system_ca_file: str) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=cluster_name(dest),
        connect_timeout=duration_pb2.Duration(seconds=5),
    )
    if dest.address is not None or dest.consul is not None:
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(ads())
    else:
        cluster.type = cluster_pb2.Cluster.LOGICAL_DNS
        cluster.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
        cluster.load_assignment.CopyFrom(single_endpoint(cluster.name, dest.host, dest.port))
    if dest.tls == "originate":
        cluster.transport_socket.name = "envoy.transport_sockets.tls"
        cluster.transport_socket.typed_config.CopyFrom(pack(upstream_tls(dest, system_ca_file)))
    return cluster


def destination_endpoints(dest: Destination) -> endpoint_pb2.ClusterLoadAssignment:
    assert dest.address is not None
    host, port = dest.address
    return single_endpoint(cluster_name(dest), host, port)


def instance_endpoints(
    dest: Destination, instances: Sequence[tuple[str, int]]
) -> endpoint_pb2.ClusterLoadAssignment:
    """A Consul-backed destination's assignment: its instances in a stable order."""
    lb = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=socket_address(host, port))
        )
        for host, port in sorted(set(instances))
    ]
    endpoints = [endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb)] if lb else []
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(dest), endpoints=endpoints)


def upstream_tls(dest: Destination, system_ca_file: str) -> tls_pb2.UpstreamTlsContext:
    """TLS to the real upstream: SNI and certificate checked against its name, fail closed."""
    validation = common_pb2.CertificateValidationContext(
        match_typed_subject_alt_names=[
            common_pb2.SubjectAltNameMatcher(
                san_type=common_pb2.SubjectAltNameMatcher.DNS,
                matcher=string_pb2.StringMatcher(exact=dest.host),
            )
        ]
    )
    # Envoy refuses SAN checks without an explicit trust anchor, so "the system store" is the
    # bundle file the control plane found on its host (gateways run the same images).
    ca_file = dest.ca_file or system_ca_file
    validation.trusted_ca.CopyFrom(base_pb2.DataSource(filename=ca_file))
    return tls_pb2.UpstreamTlsContext(
        sni=dest.host,
        common_tls_context=tls_pb2.CommonTlsContext(validation_context=validation),
    )


def egress_listener(
    port: int, bind_address: str, filters: list[hcm_pb2.HttpFilter]
) -> listener_pb2.Listener:
    """`filters`: the HTTP filters before the router, in order."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="egress",
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=ROUTE_NAME),
        http_filters=[*filters, router_filter()],
        upgrade_configs=[connect_upgrade()],
        local_reply_config=refusal_bodies(),
    )
    # the audit spool is the gateway's one request log: a second (stdout) logger costs
    # throughput on the hot path for a copy of the same lines
    audit_connection_manager(hcm)
    return http_listener(LISTENER_NAME, bind_address, port, hcm)


def rate_limit_filter() -> hcm_pb2.HttpFilter:
    """Enabled per route only: routes of rules without a rateLimit carry no bucket."""
    return hcm_pb2.HttpFilter(
        name=RATE_LIMIT_FILTER,
        typed_config=pack(local_rate_limit_pb2.LocalRateLimit(stat_prefix="meshgate_rl")),
    )


# Envoy response flags meaning the upstream could not answer.
UPSTREAM_FLAGS = ("UF", "UH", "UO", "URX", "UT", "UC", "UPE", "NC", "UMSDR")


def refusal_bodies(agent: str = f"%REQ({AGENT_HEADER})%") -> hcm_pb2.LocalReplyConfig:
    """Envoy's own refusals (rate limit, unreachable upstream) as the same small JSON.

    Upstream failures are matched by response flag, not status, so meshgate's own direct
    responses (403, 503 credential_unavailable) keep their bodies; 429 only comes from the limiter.
    """

    def mapper(
        when: accesslog_pb2.AccessLogFilter, fields: dict[str, str]
    ) -> hcm_pb2.ResponseMapper:
        return hcm_pb2.ResponseMapper(filter=when, body_format_override=json_body(fields))

    status_429 = accesslog_pb2.AccessLogFilter(
        status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=accesslog_pb2.ComparisonFilter.EQ,
                value=base_pb2.RuntimeUInt32(default_value=429, runtime_key="meshgate.rl_status"),
            )
        )
    )
    upstream_failed = accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=list(UPSTREAM_FLAGS))
    )
    return hcm_pb2.LocalReplyConfig(
        mappers=[
            mapper(status_429, {"error": "rate_limited", "agent": agent, "route": "%ROUTE_NAME%"}),
            mapper(
                upstream_failed,
                {
                    "error": "upstream_error",
                    "agent": agent,
                    "reason": "%RESPONSE_CODE_DETAILS%",
                },
            ),
        ]
    )


def egress_routes(
    model: PolicyModel, secrets: Mapping[str, str], trust_domain: str | None = None
) -> route_pb2.RouteConfiguration:
    vhosts = [_destination_vhost(*key) for key in _vhost_keys(model, secrets, trust_domain)]
    vhosts.append(_unknown_destination_vhost())
    return route_pb2.RouteConfiguration(
        name=ROUTE_NAME,
        virtual_hosts=vhosts,
        response_headers_to_add=[policy_version_header(model.version)],
    )


def egress_routes_encoded(
    model: PolicyModel, secrets: Mapping[str, str], trust_domain: str | None = None
) -> Encoded:
    """The same bytes as `egress_routes(...)` serialised, assembled from per-host bytes.

    A one-agent change re-serialises only the virtual hosts that agent uses, not the whole
    (possibly megabytes large) route table. The policy version is the one per-table field
    (the response header saying which policy decided), so no route depends on it.
    """
    parts = [string_field(1, ROUTE_NAME)]
    keys = _vhost_keys(model, secrets, trust_domain)
    parts.extend(length_delimited(2, _vhost_bytes(*key)) for key in keys)
    parts.append(length_delimited(2, _unknown_vhost_bytes()))
    version = policy_version_header(model.version).SerializeToString(deterministic=True)
    parts.append(length_delimited(4, version))
    return Encoded(ROUTE_NAME, ROUTE_TYPE, b"".join(parts))


ROUTE_TYPE = "type.googleapis.com/" + route_pb2.RouteConfiguration.DESCRIPTOR.full_name
VhostKey = tuple[Destination, tuple[Grant, ...], bool, str | None]


def _vhost_keys(
    model: PolicyModel, secrets: Mapping[str, str], trust_domain: str | None
) -> list[VhostKey]:
    grants = grants_by_destination(model)
    return [
        (d, grants[d.name], has_credential(d, secrets) or not d.credentials, trust_domain)
        for d in model.destinations
    ]


@functools.lru_cache(maxsize=10_000)
def _vhost_bytes(
    dest: Destination, grants: tuple[Grant, ...], credential_ready: bool, trust_domain: str | None
) -> bytes:
    vhost = _destination_vhost(dest, grants, credential_ready, trust_domain)
    return bytes(vhost.SerializeToString(deterministic=True))


@functools.lru_cache(maxsize=1)
def _unknown_vhost_bytes() -> bytes:
    return bytes(_unknown_destination_vhost().SerializeToString(deterministic=True))


def _unknown_destination_vhost() -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(
        name="unknown-destination",
        domains=["*"],
        routes=[
            route_components_pb2.Route(
                name="unknown-destination",
                match=match,
                direct_response=json_refusal(
                    403, {"error": "unknown_destination", "host": "%REQ(:AUTHORITY)%"}
                ),
            )
            for match in (
                route_components_pb2.RouteMatch(
                    connect_matcher=route_components_pb2.RouteMatch.ConnectMatcher()
                ),
                route_components_pb2.RouteMatch(prefix="/"),
            )
        ],
    )


@functools.lru_cache(maxsize=10_000)
def _destination_vhost(
    dest: Destination, grants: tuple[Grant, ...], credential_ready: bool, trust_domain: str | None
) -> route_components_pb2.VirtualHost:
    """Memoised on its inputs: a one-agent change rebuilds only the hosts that agent uses.

    The returned message is shared: callers copy it into their RouteConfiguration.
    """
    if dest.credentials is not None and not credential_ready:
        # fail closed and say why, rather than send the request without its credential
        routes = [
            route_components_pb2.Route(
                name=f"no-credential/{dest.name}",
                match=route_components_pb2.RouteMatch(prefix="/"),
                direct_response=json_refusal(
                    503,
                    {
                        "error": "credential_unavailable",
                        "destination": dest.name,
                        "reason": f"secret {dest.credentials.secret!r} not found",
                    },
                ),
            )
        ]
    else:
        routes = destination_routes(dest, cluster_name(dest), grants, trust_domain)
    return route_components_pb2.VirtualHost(
        name=dest.name,
        domains=[dest.host, f"{dest.host}:{dest.port}"],
        routes=routes,
        # identity is the gateway's business; upstream tools never see (or trust) the header
        request_headers_to_remove=[AGENT_HEADER],
    )

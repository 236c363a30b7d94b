"""Policy model -> the egress gateway's Envoy resources. Pure: no I/O, stable order."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.mcp.v3 import mcp_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2
from google.api.expr.v1alpha1 import syntax_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from meshgate.delegation.expand import SERVICE_DESTINATION
from meshgate.policy.model import Destination, PolicyModel
from meshgate.xds.access_log import (
    BODY_GUARD_POLICY,
    PATH_NOT_CANONICAL,
    PATH_TOO_LONG,
    RBAC_DENIED,
    audit_connection_manager,
    policy_version_header,
)
from meshgate.xds.allowlist import (
    AGENT_HEADER,
    BODY_GUARD_FILTER,
    MCP_BODY_LIMIT,
    MCP_FILTER,
    RATE_LIMIT_FILTER,
    Grant,
    connect_refusal_reason,
    destination_routes,
    grants_by_destination,
    paced,
    rate_limit_config,
)
from meshgate.xds.common import (
    ads,
    connect_upgrade,
    http_listener,
    json_body,
    json_refusal,
    only_for_destinations,
    pack,
    re2_escape,
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
from meshgate.xds.pacing import (
    global_limit_filters,
    longest_wait_ms,
    pacer_filter,
)
from meshgate.xds.snapshot import Encoded
from meshgate.xds.tool_identity import ToolTokens, tool_identity_resources
from meshgate.xds.wire import length_delimited, string_field

LISTENER_NAME = "egress-http"
BUFFER_FILTER = "envoy.filters.http.buffer"
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
    # MCP parsing first: it re-selects the route the rate limiters, the pacer and injectors use
    filters = [rate_limit_filter(), *global_limit_filters(model)]
    grants = grants_by_destination(model)  # each rule's pace, worked out once per build
    if paced(grants):
        filters.append(pacer_filter(longest_wait_ms(model)))
    if injecting:
        filters.append(injector_filter(injecting, model.destinations))
    tool_identity, tool_secrets = (
        tool_identity_resources(model, tool_tokens) if identity and tool_tokens else (None, [])
    )
    if tool_identity is not None:
        filters.append(tool_identity)
    tool_hosts = _tool_rule_destinations(model)
    if tool_hosts:
        # PASS_THROUGH: the routes decide what an unparsed request may do (allowlist._tool_matches)
        whole_body = buffer_pb2.Buffer(
            max_request_bytes=wrappers_pb2.UInt32Value(value=MCP_BODY_LIMIT)
        )
        mcp = mcp_pb2.Mcp(
            clear_route_cache=True,
            max_request_body_size=wrappers_pb2.UInt32Value(value=MCP_BODY_LIMIT),
        )
        # whole bodies (up to the limit, else 413) before parsing: the parser sees all of a
        # body, and a chunked body gets its Content-Length (see allowlist._body_guard)
        filters[0:0] = only_for_destinations(
            [
                (BUFFER_FILTER, pack(whole_body)),
                (MCP_FILTER, pack(mcp)),
                (BODY_GUARD_FILTER, pack(http_rbac_pb2.RBAC())),
            ],
            tool_hosts,
            model.destinations,
        )
    filters.insert(0, path_guard_filter())
    listener = egress_listener(model.mesh.gateway_listen_port, options.gateway_bind, filters)
    if identity is not None:
        require_agent_certificates(listener)
        out.extend(identity_secrets(identity, f"spiffe://{model.mesh.trust_domain}/agent/"))
    out.append(listener)
    out.append(egress_routes_encoded(model, secrets, trust_domain, grants))
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


def _tool_rule_destinations(model: PolicyModel) -> tuple[Destination, ...]:
    """Destinations with MCP tool rules: only their bodies are parsed."""
    names = {r.destination for a in model.agents for r in a.rules if r.tools and r.enforced}
    return tuple(d for d in model.destinations if d.name in names)


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
        # rules are matched on, and requests forwarded with, the canonical path: dot segments
        # resolved (also percent-encoded ones), repeated slashes merged, %2F/%5C refused
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.REJECT_REQUEST,
    )
    hcm.early_header_mutation_extensions.append(strip_agent_headers())
    # the audit spool is the gateway's one request log: a second (stdout) logger costs
    # throughput on the hot path for a copy of the same lines
    audit_connection_manager(hcm)
    return http_listener(LISTENER_NAME, bind_address, port, hcm)


# Headers an agent may not send upstream: the tool-JWT header (only the gateway's injector sets
# it) and method overrides, which would make an upstream act on another method than the one the
# rule allowed. Removed before anything else reads the request.
STRIPPED_HEADERS = (
    "x-meshgate-identity",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
)


def strip_agent_headers() -> extension_pb2.TypedExtensionConfig:
    mutation = header_mutation_pb2.HeaderMutation(
        mutations=[mutation_rules_pb2.HeaderMutation(remove=h) for h in STRIPPED_HEADERS]
    )
    return extension_pb2.TypedExtensionConfig(
        name="meshgate.strip-agent-headers", typed_config=pack(mutation)
    )


# Bytes of :path (query included) the gateway accepts, checked on the normalised path that rules
# see and upstreams get (Envoy normalises before any filter runs; the raw request line is bounded
# by Envoy's 60 KiB header limit). Longer is refused, so a record always holds the whole path.
MAX_PATH = 8192
PATH_FILTER = "meshgate.path-guard"
# What Envoy's normalisation leaves that upstreams may still read as a way out of a prefix:
# `..;x` / `.;x` segments (servlet path parameters), `%3B` after dots, backslashes (raw or
# encoded, which some servers treat as `/`), a dot segment Envoy did not resolve, or a
# percent-encoded dot or slash. (Envoy's regexes match the whole path.)
NON_CANONICAL_PATH = (
    r".*("
    r"(^|/)\.\.?(;|%3[bB])"
    r"|\\"
    r"|%5[cC]|%2[fF]|%2[eE]"
    r"|(^|/)\.\.?(/|$)"
    r").*"
)


def _cel_call(function: str, *args: syntax_pb2.Expr) -> syntax_pb2.Expr:
    return syntax_pb2.Expr(call_expr=syntax_pb2.Expr.Call(function=function, args=list(args)))


def path_guard_filter() -> hcm_pb2.HttpFilter:
    """Refuse, before any route is used, a :path longer than MAX_PATH (no record need cut it)
    or one Envoy could not make canonical (NON_CANONICAL_PATH).
    Local replies (`refusal_bodies`) turn the RBAC refusals into JSON with a reason."""
    request = syntax_pb2.Expr(ident_expr=syntax_pb2.Expr.Ident(name="request"))
    request_path = syntax_pb2.Expr(
        select_expr=syntax_pb2.Expr.Select(operand=request, field="path")
    )
    too_long = _cel_call(
        "_>_",
        _cel_call("size", request_path),
        syntax_pb2.Expr(const_expr=syntax_pb2.Constant(int64_value=MAX_PATH)),
    )
    anyone = [rbac_pb2.Principal(any=True)]
    rules = rbac_pb2.RBAC(
        action=rbac_pb2.RBAC.DENY,
        policies={
            PATH_TOO_LONG: rbac_pb2.Policy(
                permissions=[rbac_pb2.Permission(any=True)], principals=anyone, condition=too_long
            ),
            PATH_NOT_CANONICAL: rbac_pb2.Policy(
                permissions=[
                    rbac_pb2.Permission(
                        url_path=path_pb2.PathMatcher(
                            path=string_pb2.StringMatcher(
                                safe_regex=regex_pb2.RegexMatcher(regex=NON_CANONICAL_PATH)
                            )
                        )
                    )
                ],
                principals=anyone,
            ),
        },
    )
    return hcm_pb2.HttpFilter(name=PATH_FILTER, typed_config=pack(http_rbac_pb2.RBAC(rules=rules)))


def rate_limit_filter() -> hcm_pb2.HttpFilter:
    """Enabled per virtual host: hosts whose rules have no rateLimit carry no buckets."""
    return hcm_pb2.HttpFilter(
        name=RATE_LIMIT_FILTER,
        typed_config=pack(local_rate_limit_pb2.LocalRateLimit(stat_prefix="meshgate_rl")),
    )


# Envoy response flags meaning the upstream could not answer.
UPSTREAM_FLAGS = ("UF", "UH", "UO", "URX", "UT", "UC", "UPE", "NC", "UMSDR")


def refusal_bodies(agent: str = f"%REQ({AGENT_HEADER})%") -> hcm_pb2.LocalReplyConfig:
    """Envoy's own refusals (rate limit, unreachable upstream) as the same small JSON.

    Upstream failures and rate limits are matched by response flag, not status, so meshgate's
    own direct responses (403, 503 credential_unavailable) and the pacer's keep their bodies.
    """

    def mapper(
        when: accesslog_pb2.AccessLogFilter, fields: dict[str, str]
    ) -> hcm_pb2.ResponseMapper:
        return hcm_pb2.ResponseMapper(filter=when, body_format_override=json_body(fields))

    upstream_failed = accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=list(UPSTREAM_FLAGS))
    )

    def details(expression: str) -> accesslog_pb2.AccessLogFilter:
        return accesslog_pb2.AccessLogFilter(
            extension_filter=accesslog_pb2.ExtensionFilter(
                name="envoy.access_loggers.extension_filters.cel",
                typed_config=pack(cel_pb2.ExpressionFilter(expression=expression)),
            )
        )

    def refusal(
        when: accesslog_pb2.AccessLogFilter, status: int, fields: dict[str, str]
    ) -> hcm_pb2.ResponseMapper:
        m = mapper(when, fields)
        m.status_code.value = status
        return m

    rbac = RBAC_DENIED
    return hcm_pb2.LocalReplyConfig(
        mappers=[
            refusal(
                details(f"response.code_details == '{rbac}[{PATH_TOO_LONG}]'"),
                414,
                {
                    "error": "path_too_long",
                    "agent": agent,
                    "reason": f"the request path is longer than {MAX_PATH} bytes",
                },
            ),
            refusal(
                details(
                    f"response.code_details == '{rbac}[{PATH_NOT_CANONICAL}]'"
                    " || response.code_details == 'path_normalization_failed'"
                ),
                400,
                {
                    "error": "path_not_canonical",
                    "agent": agent,
                    "reason": "the path has a segment or escape the gateway cannot make "
                    "canonical: a `..;` segment, a backslash, or an encoded slash, "
                    "backslash or dot",
                },
            ),
            refusal(
                details(f"response.code_details == '{rbac}[{BODY_GUARD_POLICY}]'"),
                403,
                {
                    "error": "mcp_unparsed",
                    "agent": agent,
                    "reason": "a request with a body the MCP filter did not read as JSON-RPC "
                    "(a tool call cannot be ruled out)",
                },
            ),
            refusal(
                details("response.code_details == 'request_payload_too_large'"),
                413,
                {
                    "error": "body_too_large",
                    "agent": agent,
                    "reason": f"request bodies to MCP tool hosts are limited to {MCP_BODY_LIMIT} "
                    "bytes",
                },
            ),
            refusal(
                details("response.code_details.startsWith('mcp_')"),
                403,
                {
                    "error": "mcp_unparsed",
                    "agent": agent,
                    "reason": "MCP filter: %LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)",
                },
            ),
            # Envoy's local limiter by its details, not by status: the pacer's own 429s
            # (budgets, global limits) carry their own bodies and must keep them
            mapper(
                details("response.code_details == 'local_rate_limited'"),
                {"error": "rate_limited", "agent": agent, "route": "%ROUTE_NAME%"},
            ),
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
    model: PolicyModel,
    secrets: Mapping[str, str],
    trust_domain: str | None = None,
    grants: Mapping[str, tuple[Grant, ...]] | None = None,
) -> Encoded:
    """The same bytes as `egress_routes(...)` serialised, assembled from per-host bytes.

    A one-agent change re-serialises only the virtual hosts that agent uses, not the whole
    (possibly megabytes large) route table. The policy version is the one per-table field
    (the response header saying which policy decided), so no route depends on it.
    `grants`: `grants_by_destination(model)`, when the caller has it already.
    """
    parts = [string_field(1, ROUTE_NAME)]
    keys = _vhost_keys(model, secrets, trust_domain, grants)
    parts.extend(length_delimited(2, _vhost_bytes(*key)) for key in keys)
    parts.append(length_delimited(2, _unknown_vhost_bytes()))
    version = policy_version_header(model.version).SerializeToString(deterministic=True)
    parts.append(length_delimited(4, version))
    return Encoded(ROUTE_NAME, ROUTE_TYPE, b"".join(parts))


ROUTE_TYPE = "type.googleapis.com/" + route_pb2.RouteConfiguration.DESCRIPTOR.full_name
VhostKey = tuple[Destination, tuple[Grant, ...], bool, str | None]


def _vhost_keys(
    model: PolicyModel,
    secrets: Mapping[str, str],
    trust_domain: str | None,
    grants: Mapping[str, tuple[Grant, ...]] | None = None,
) -> list[VhostKey]:
    if grants is None:
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


def _unknown_destination_routes(
    headers: Sequence[route_components_pb2.HeaderMatcher] = (),
) -> list[route_components_pb2.Route]:
    return [
        route_components_pb2.Route(
            name="unknown-destination",
            match=match,
            direct_response=json_refusal(
                403, {"error": "unknown_destination", "host": "%REQ(:AUTHORITY)%"}
            ),
        )
        for match in (
            route_components_pb2.RouteMatch(
                connect_matcher=route_components_pb2.RouteMatch.ConnectMatcher(), headers=headers
            ),
            route_components_pb2.RouteMatch(prefix="/", headers=headers),
        )
    ]


def _unknown_destination_vhost() -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(
        name="unknown-destination", domains=["*"], routes=_unknown_destination_routes()
    )


def _deeper_names(host: str) -> route_components_pb2.HeaderMatcher:
    """`:authority` naming more than one label where a wildcard host (`*.x`) stands for one:
    Envoy's `*.x` domain takes any suffix (`a.b.x` too), the policy's wildcard does not."""
    suffix = re2_escape(host[1:])  # `.x`
    return route_components_pb2.HeaderMatcher(
        name=":authority",
        string_match=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=rf"(?i)[^:]*\.[^:]*{suffix}\.?(:[0-9]+)?")
        ),
    )


@functools.lru_cache(maxsize=10_000)
def _destination_vhost(
    dest: Destination, grants: tuple[Grant, ...], credential_ready: bool, trust_domain: str | None
) -> route_components_pb2.VirtualHost:
    """Memoised on its inputs: a one-agent change rebuilds only the hosts that agent uses.

    The returned message is shared: callers copy it into their RouteConfiguration.
    """
    if dest.credentials is not None and not credential_ready:
        # fail closed and say why, rather than send the request without its credential; a
        # CONNECT needs a route of its own (prefix routes never match one): without it the
        # agent got Envoy's bare 404 (issue 21)
        routes = [
            route_components_pb2.Route(
                name=f"deny-connect/{dest.name}",
                match=route_components_pb2.RouteMatch(
                    connect_matcher=route_components_pb2.RouteMatch.ConnectMatcher()
                ),
                direct_response=json_refusal(
                    403,
                    {
                        "error": "egress_denied",
                        "agent": f"%REQ({AGENT_HEADER})%",
                        "destination": dest.name,
                        "reason": connect_refusal_reason(dest),
                    },
                ),
            ),
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
            ),
        ]
    else:
        routes = destination_routes(dest, cluster_name(dest), grants, trust_domain)
    if dest.host.startswith("*."):  # one label only, as the policy says
        routes = [*_unknown_destination_routes([_deeper_names(dest.host)]), *routes]
    vhost = route_components_pb2.VirtualHost(
        name=dest.name,
        domains=[dest.host, f"{dest.host}:{dest.port}"],
        routes=routes,
        # identity is the gateway's business; upstream tools never see (or trust) the header,
        # but for the delegation endpoint, which learns the caller from it (with mTLS only:
        # then the gateway set it from the verified certificate)
        request_headers_to_remove=(
            [] if trust_domain and dest.name == SERVICE_DESTINATION else [AGENT_HEADER]
        ),
    )
    limits = rate_limit_config(dest, grants)
    if limits is not None:  # one bucket per rule, shared by all the rule's routes
        vhost.typed_per_filter_config[RATE_LIMIT_FILTER].CopyFrom(pack(limits))
    return vhost

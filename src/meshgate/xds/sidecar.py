"""Policy model -> an agent's sidecar: routes that send everything to the gateway.

The sidecar stamps the agent's identity header (overwriting anything the agent sent), so the
gateway's allowlist applies; the agent itself needs only HTTP_PROXY.

The proxy *listener* is not part of the snapshot: each sidecar's launcher puts it in that
sidecar's bootstrap (`proxy_listener`), on an address no other sidecar shares (its own loopback
port without SO_REUSEPORT, or only inside the agent's network namespace in strict mode). A
listener sent over LDS would be the same for every sidecar of an agent, which is how one port
ended up shared by every sidecar on a host. The listener fetches these routes over RDS.

HTTPS interception (identity/agent_trust.py): a CONNECT to an intercepted destination's
`host:port` is not forwarded. The sidecar answers 200 itself and hands the tunnel's bytes to an
Envoy *internal listener* (`INTERCEPT_LISTENER`, no socket: nothing else can connect to it),
which terminates the agent's TLS with that host's agent-trust certificate (SDS, picked by SNI)
and runs the same routes as the proxy listener. So what the agent sends inside the tunnel is
stamped and forwarded to the gateway over mTLS exactly like plain HTTP, and the gateway applies
methods, paths, tools, credentials and audit as it does today, then opens TLS upstream.
Every other CONNECT is forwarded as CONNECT, and the gateway answers it (a tunnel for
`tls: passthrough`, else a JSON refusal saying why).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from meshgate.identity.agent_trust import HostCertificate
from meshgate.xds.access_log import GATEWAY_UNREACHABLE_FLAGS, sidecar_spool_access_log
from meshgate.xds.allowlist import AGENT_HEADER
from meshgate.xds.common import (
    ads,
    connect_upgrade,
    host_regex,
    http_listener,
    json_body,
    pack,
    router_filter,
    single_endpoint,
    stdout_access_log,
)
from meshgate.xds.mtls import NodeIdentity, identity_secrets, sidecar_tls
from meshgate.xds.options import TranslateOptions

GATEWAY_CLUSTER = "meshgate-gateway"
PROXY_LISTENER = "agent-proxy"
INTERCEPT_LISTENER = "meshgate-intercept"  # an internal listener: no address, no socket
INTERCEPT_CLUSTER = "meshgate-intercept"
INTERCEPT_SECRET_PREFIX = "meshgate-intercept/"  # + host: that host's agent-trust leaf
INTERNAL_LISTENER_EXTENSION = "envoy.bootstrap.internal_listener"

# (host, port) of every intercepted destination whose certificate the sidecar holds
Intercepted = tuple[tuple[str, int], ...]


def route_name(agent: str) -> str:
    return f"agent-{agent}"


def sidecar_resources(
    agent: str,
    gateway_port: int,
    options: TranslateOptions,
    identity: NodeIdentity | None = None,
    trust_domain: str | None = None,
    intercepted: Intercepted = (),
    certificates: Sequence[HostCertificate] = (),
) -> list[Message]:
    """With `identity`, the hop to the gateway is mTLS with the agent's own certificate.
    `intercepted`/`certificates`: destinations whose CONNECT the sidecar opens (see above)."""
    cluster = gateway_cluster(gateway_port, options, tls=identity is not None)
    routes = agent_routes(agent, intercepted)
    out: list[Message] = []
    if identity is not None:
        out.extend(identity_secrets(identity, f"spiffe://{trust_domain}/gateway/"))
    out += [cluster, routes]
    if intercepted:
        out += [
            *intercept_secrets(certificates),
            intercept_cluster(),
            intercept_listener(agent, tuple(c.host for c in certificates)),
        ]
    return out


def gateway_cluster(gateway_port: int, options: TranslateOptions, tls: bool) -> cluster_pb2.Cluster:
    """The cluster to the gateway: the same for every agent (so built and encoded once)."""
    host, port = options.gateway_address or ("127.0.0.1", gateway_port)
    cluster = cluster_pb2.Cluster(
        name=GATEWAY_CLUSTER,
        type=cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=duration_pb2.Duration(seconds=5),
    )
    cluster.load_assignment.CopyFrom(single_endpoint(GATEWAY_CLUSTER, host, port))
    if tls:
        cluster.transport_socket.name = "envoy.transport_sockets.tls"
        cluster.transport_socket.typed_config.CopyFrom(pack(sidecar_tls()))
    return cluster


def agent_routes(agent: str, intercepted: Intercepted = ()) -> route_pb2.RouteConfiguration:
    """Everything to the gateway, with the agent's identity header stamped; a CONNECT to an
    intercepted destination is opened here, into the intercept listener."""
    return route_pb2.RouteConfiguration(
        name=route_name(agent),
        virtual_hosts=[
            rc.VirtualHost(
                name="to-gateway",
                domains=["*"],
                routes=[
                    *(intercept_route(host, port) for host, port in intercepted),
                    # any other CONNECT is forwarded as CONNECT: the gateway decides on it
                    rc.Route(
                        match=rc.RouteMatch(connect_matcher=rc.RouteMatch.ConnectMatcher()),
                        route=rc.RouteAction(
                            cluster=GATEWAY_CLUSTER,
                            upgrade_configs=[rc.RouteAction.UpgradeConfig(upgrade_type="CONNECT")],
                        ),
                    ),
                    rc.Route(
                        match=rc.RouteMatch(prefix="/"),
                        # the gateway's routes bound a request, not this hop: Envoy's default
                        # 15 s cap would cut every longer LLM stream
                        route=rc.RouteAction(
                            cluster=GATEWAY_CLUSTER, timeout=duration_pb2.Duration(seconds=0)
                        ),
                    ),
                ],
                request_headers_to_add=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=AGENT_HEADER, value=agent),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ],
            )
        ],
    )


def proxy_listener(
    agent: str, host: str, port: int, netns_path: str | None = None
) -> listener_pb2.Listener:
    """The agent's HTTP proxy, for one sidecar's bootstrap: `host:port` (port 0: a free one,
    read back from Envoy's admin), never shared through SO_REUSEPORT, so a second sidecar on
    the same port fails to start instead of taking a share of the first one's connections.
    `netns_path`: open it inside that network namespace (strict mode) instead of the host's."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="agent",
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=route_name(agent)),
        http_filters=[router_filter()],
        upgrade_configs=[connect_upgrade()],
        access_log=[stdout_access_log(), sidecar_spool_access_log()],
        # Python's http.client (urllib, and what builds on it) opens its tunnels with
        # `CONNECT host:443 HTTP/1.0`: without this Envoy answers 426 and nothing says why
        http_protocol_options=protocol_pb2.Http1ProtocolOptions(accept_http_10=True),
        local_reply_config=gateway_unreachable_body(agent),
    )
    listener = http_listener(PROXY_LISTENER, host, port, hcm)
    listener.enable_reuse_port.CopyFrom(wrappers_pb2.BoolValue(value=False))
    if netns_path is not None:
        listener.address.socket_address.network_namespace_filepath = netns_path
    return listener


def intercept_route(host: str, port: int) -> rc.Route:
    """CONNECT host:port (any case, as Envoy matches hosts) ends here: 200 to the agent, and
    the tunnel's bytes to the intercept listener, which terminates the agent's TLS."""
    # a wildcard host stands for one whole label, as destinations allow
    pattern = f"(?i){host_regex(host)}:{port}"
    return rc.Route(
        name=f"intercept/{host}:{port}",
        match=rc.RouteMatch(
            connect_matcher=rc.RouteMatch.ConnectMatcher(),
            headers=[
                rc.HeaderMatcher(
                    name=":authority",
                    string_match=string_pb2.StringMatcher(
                        safe_regex=regex_pb2.RegexMatcher(regex=pattern)
                    ),
                )
            ],
        ),
        route=rc.RouteAction(
            cluster=INTERCEPT_CLUSTER,
            upgrade_configs=[
                rc.RouteAction.UpgradeConfig(
                    upgrade_type="CONNECT",
                    connect_config=rc.RouteAction.UpgradeConfig.ConnectConfig(),
                )
            ],
        ),
    )


def intercept_secret_name(host: str) -> str:
    return INTERCEPT_SECRET_PREFIX + host


def intercept_secrets(certificates: Sequence[HostCertificate]) -> list[secret_pb2.Secret]:
    """Each intercepted host's leaf and key: only in this sidecar's SDS, never in a file."""
    return [
        secret_pb2.Secret(
            name=intercept_secret_name(c.host),
            tls_certificate=common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=c.chain_pem),
                private_key=base_pb2.DataSource(inline_bytes=c.key_pem),
            ),
        )
        for c in certificates
    ]


def intercept_cluster() -> cluster_pb2.Cluster:
    """Where an opened CONNECT's bytes go: the internal listener, inside this Envoy."""
    endpoint = endpoint_components_pb2.Endpoint(
        address=address_pb2.Address(
            envoy_internal_address=address_pb2.EnvoyInternalAddress(
                server_listener_name=INTERCEPT_LISTENER
            )
        )
    )
    return cluster_pb2.Cluster(
        name=INTERCEPT_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=5),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=INTERCEPT_CLUSTER,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[endpoint_components_pb2.LbEndpoint(endpoint=endpoint)]
                )
            ],
        ),
    )


def intercept_listener(agent: str, hosts: Sequence[str]) -> listener_pb2.Listener:
    """The agent's TLS ends here: one filter chain per host, chosen by SNI (a name with no
    certificate gets no chain: the handshake fails), each serving that host's leaf with
    ALPN h2 and http/1.1, then the agent's own routes, as on the proxy listener. No CONNECT
    inside: a tunnel in a tunnel is refused (404 from Envoy's codec, nothing forwarded)."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="agent_intercept",
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=route_name(agent)),
        http_filters=[router_filter()],
        access_log=_access_logs(),
        local_reply_config=gateway_unreachable_body(agent),
    )
    packed = pack(hcm)  # the same for every host: built and encoded once
    chains = []
    for host in hosts:
        tls = tls_pb2.DownstreamTlsContext(
            common_tls_context=tls_pb2.CommonTlsContext(
                alpn_protocols=["h2", "http/1.1"],
                tls_certificate_sds_secret_configs=[
                    secret_pb2.SdsSecretConfig(name=intercept_secret_name(host), sds_config=ads())
                ],
            )
        )
        chain = listener_components_pb2.FilterChain(
            name=host,
            filter_chain_match=listener_components_pb2.FilterChainMatch(server_names=[host]),
            filters=[
                listener_components_pb2.Filter(
                    name="envoy.filters.network.http_connection_manager", typed_config=packed
                )
            ],
        )
        chain.transport_socket.name = "envoy.transport_sockets.tls"
        chain.transport_socket.typed_config.CopyFrom(pack(tls))
        chains.append(chain)
    return listener_pb2.Listener(
        name=INTERCEPT_LISTENER,
        internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        listener_filters=[
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.tls_inspector",
                typed_config=pack(tls_inspector_pb2.TlsInspector()),
            )
        ],
        filter_chains=chains,
    )


@functools.cache
def _access_logs() -> tuple[accesslog_pb2.AccessLog, ...]:
    """Built once (the spool format is a large Struct); a repeated field copies what it gets."""
    return (stdout_access_log(), sidecar_spool_access_log())


def gateway_unreachable_body(agent: str) -> hcm_pb2.LocalReplyConfig:
    """The one answer a sidecar gives itself (the gateway could not be reached, a CONNECT
    included) as JSON saying so, like the gateway's refusals; audited from its own spool."""
    unreachable = accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=list(GATEWAY_UNREACHABLE_FLAGS))
    )
    fields = {
        "error": "gateway_unreachable",
        "agent": agent,
        "reason": "the sidecar could not reach the egress gateway (%RESPONSE_CODE_DETAILS%)",
    }
    return hcm_pb2.LocalReplyConfig(
        mappers=[hcm_pb2.ResponseMapper(filter=unreachable, body_format_override=json_body(fields))]
    )

"""Envoy bootstrap for gateways and sidecars: who the node is and where its control plane is.

Everything else arrives over ADS. Built as a typed Bootstrap proto and written as JSON.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    protocol_pb2,
)
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.bootstrap.internal_listener.v3 import internal_listener_pb2
from envoy.extensions.filters.http.health_check.v3 import health_check_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import duration_pb2, json_format, wrappers_pb2

from meshgate.pacing.spec import LIMITS_CLUSTER, PACER_CLUSTER, limits_socket
from meshgate.xds.common import (
    ads,
    http_listener,
    pack,
    router_filter,
    single_endpoint,
)
from meshgate.xds.sidecar import INTERNAL_LISTENER_EXTENSION, proxy_listener

XDS_CLUSTER = "meshgate-xds"
GATEWAY_NODE_CLUSTER = "meshgate-gateway"  # node cluster of gateways (sidecars: meshgate-agent)
PACER_SOCKET = "pacer.sock"  # beside the admin socket: the same private (0700) directory
HEALTH_LISTENER = "meshgate-health"
HEALTH_PATH = "/healthz/ready"
HEALTH_HOST = "127.0.0.1"
ADMIN_SOCKET_MODE = 0o600


@dataclass(frozen=True)
class ProxyBinding:
    """Where one sidecar's proxy listener binds (see xds/sidecar.proxy_listener)."""

    agent: str
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, read back from Envoy's admin
    netns_path: str | None = None  # strict mode: inside this network namespace only


@dataclass(frozen=True)
class BootstrapSpec:
    node_id: str
    node_cluster: str
    xds_host: str
    xds_port: int
    admin_socket: str  # Envoy's admin: a unix socket (mode 0600), never a TCP port
    delta: bool = False
    metadata: tuple[tuple[str, str], ...] = field(default=())  # gRPC initial metadata
    xds_ca_file: str | None = None  # set: the xDS connection is TLS, verified against this bundle
    proxy: ProxyBinding | None = None  # sidecars: the agent's HTTP proxy listener
    health_port: int | None = None  # set: GET /healthz/ready on 127.0.0.1:PORT, nothing else


def build_bootstrap(spec: BootstrapSpec) -> bootstrap_pb2.Bootstrap:
    grpc_service = grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER),
        initial_metadata=[base_pb2.HeaderValue(key=k, value=v) for k, v in spec.metadata],
    )
    api_type = (
        config_source_pb2.ApiConfigSource.DELTA_GRPC
        if spec.delta
        else config_source_pb2.ApiConfigSource.GRPC
    )
    http2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    xds_cluster = cluster_pb2.Cluster(
        name=XDS_CLUSTER,
        type=cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=duration_pb2.Duration(seconds=1),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": pack(http2)
        },
    )
    if spec.xds_ca_file is not None:
        xds_cluster.transport_socket.name = "envoy.transport_sockets.tls"
        xds_cluster.transport_socket.typed_config.CopyFrom(
            pack(xds_tls_context(spec.xds_host, spec.xds_ca_file))
        )
    xds_cluster.load_assignment.CopyFrom(single_endpoint(XDS_CLUSTER, spec.xds_host, spec.xds_port))
    boot = bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id=spec.node_id, cluster=spec.node_cluster),
        dynamic_resources=bootstrap_pb2.Bootstrap.DynamicResources(
            ads_config=config_source_pb2.ApiConfigSource(
                api_type=api_type,
                transport_api_version=config_source_pb2.V3,
                grpc_services=[grpc_service],
                set_node_on_first_message_only=True,
            ),
            cds_config=ads(),
            lds_config=ads(),
        ),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(clusters=[xds_cluster]),
    )
    boot.admin.address.CopyFrom(
        address_pb2.Address(pipe=address_pb2.Pipe(path=spec.admin_socket, mode=ADMIN_SOCKET_MODE))
    )
    if spec.proxy is not None:
        p = spec.proxy
        boot.static_resources.listeners.append(
            proxy_listener(p.agent, p.host, p.port, p.netns_path)
        )
        # HTTPS interception hands opened CONNECTs to an internal listener (xds/sidecar.py)
        boot.bootstrap_extensions.add(
            name=INTERNAL_LISTENER_EXTENSION,
            typed_config=pack(internal_listener_pb2.InternalListener()),
        )
    if spec.health_port is not None:
        boot.static_resources.listeners.append(health_listener(spec.health_port))
    if spec.node_cluster == GATEWAY_NODE_CLUSTER:
        pacer = pacer_socket(spec.admin_socket)
        boot.static_resources.clusters.append(pacer_cluster(pacer))
        boot.static_resources.clusters.append(limits_cluster(limits_socket(pacer)))
    return boot


def pacer_socket(admin_socket: str | Path) -> Path:
    """Where a gateway's pacer listens: beside its Envoy's admin socket, in a directory only
    the gateway's user can enter (agents cannot reach the pacer)."""
    return Path(admin_socket).parent / PACER_SOCKET


def pacer_cluster(socket: Path) -> cluster_pb2.Cluster:
    """The static cluster the gateway's ext_proc filter calls (gRPC: HTTP/2)."""
    http2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    cluster = _pipe_cluster(PACER_CLUSTER, socket)
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].CopyFrom(pack(http2))
    return cluster


def limits_cluster(socket: Path) -> cluster_pb2.Cluster:
    """The static cluster the gateway's limits filter asks (HTTP/1.1, keep-alive)."""
    return _pipe_cluster(LIMITS_CLUSTER, socket)


def _pipe_cluster(name: str, socket: Path) -> cluster_pb2.Cluster:
    """A static cluster of one unix socket in the gateway's private directory."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=1),
    )
    endpoint = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint
    cluster.load_assignment.cluster_name = name
    endpoint.address.pipe.path = str(socket)
    return cluster


def health_listener(port: int, host: str = HEALTH_HOST) -> listener_pb2.Listener:
    """A readiness endpoint for probes from outside (Consul, the kubelet via exec) that cannot
    change anything: `GET /healthz/ready` answers 200 once Envoy serves (listeners start only
    after the initial configuration arrived) and 503 while it drains; everything else is 404.
    Envoy's health_check filter answers itself (pass_through_mode false), no admin involved."""
    health = health_check_pb2.HealthCheck(
        pass_through_mode=wrappers_pb2.BoolValue(value=False),
        headers=[_header_is(":path", HEALTH_PATH), _header_is(":method", "GET")],
    )
    nothing_else = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        direct_response=route_components_pb2.DirectResponseAction(status=404),
    )
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="meshgate_health",
        route_config=route_pb2.RouteConfiguration(
            name=HEALTH_LISTENER,
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name="health", domains=["*"], routes=[nothing_else]
                )
            ],
        ),
        http_filters=[
            hcm_pb2.HttpFilter(name="envoy.filters.http.health_check", typed_config=pack(health)),
            router_filter(),
        ],
    )
    return http_listener(HEALTH_LISTENER, host, port, hcm)


def _header_is(name: str, value: str) -> route_components_pb2.HeaderMatcher:
    return route_components_pb2.HeaderMatcher(
        name=name, string_match=string_pb2.StringMatcher(exact=value)
    )


def xds_tls_context(host: str, ca_file: str) -> tls_pb2.UpstreamTlsContext:
    """TLS to the control plane: its certificate must chain to the bundle and name `host`."""
    try:
        ipaddress.ip_address(host)
        san_type = common_pb2.SubjectAltNameMatcher.IP_ADDRESS
        sni = ""
    except ValueError:
        san_type = common_pb2.SubjectAltNameMatcher.DNS
        sni = host
    validation = common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(filename=ca_file),
        match_typed_subject_alt_names=[
            common_pb2.SubjectAltNameMatcher(
                san_type=san_type, matcher=string_pb2.StringMatcher(exact=host)
            )
        ],
    )
    return tls_pb2.UpstreamTlsContext(
        sni=sni,
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=["h2"], validation_context=validation
        ),
    )


def bootstrap_json(spec: BootstrapSpec) -> str:
    return json_format.MessageToJson(build_bootstrap(spec), indent=2)


def write_bootstrap(path: Path, spec: BootstrapSpec) -> None:
    """Write the bootstrap readable by its owner only: it can carry the node's join token."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(bootstrap_json(spec))
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    os.replace(tmp, path)

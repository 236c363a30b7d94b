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
from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import duration_pb2, json_format

from meshgate.xds.common import ads, pack, single_endpoint, socket_address
from meshgate.xds.sidecar import proxy_listener

XDS_CLUSTER = "meshgate-xds"


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
    admin_port: int
    admin_host: str = "127.0.0.1"
    delta: bool = False
    metadata: tuple[tuple[str, str], ...] = field(default=())  # gRPC initial metadata
    xds_ca_file: str | None = None  # set: the xDS connection is TLS, verified against this bundle
    proxy: ProxyBinding | None = None  # sidecars: the agent's HTTP proxy listener


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
    boot.admin.address.CopyFrom(socket_address(spec.admin_host, spec.admin_port))
    if spec.proxy is not None:
        p = spec.proxy
        boot.static_resources.listeners.append(
            proxy_listener(p.agent, p.host, p.port, p.netns_path)
        )
    return boot


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

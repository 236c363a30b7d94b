"""Policy model -> an agent's sidecar: a loopback HTTP proxy that sends everything to the gateway.

The sidecar stamps the agent's identity header (overwriting anything the agent sent), so the
gateway's allowlist applies; the agent itself needs only HTTP_PROXY.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from meshgate.xds.access_log import sidecar_spool_access_log
from meshgate.xds.allowlist import AGENT_HEADER
from meshgate.xds.common import (
    connect_upgrade,
    http_listener,
    pack,
    router_filter,
    single_endpoint,
    stdout_access_log,
)
from meshgate.xds.mtls import NodeIdentity, identity_secrets, sidecar_tls
from meshgate.xds.options import TranslateOptions

GATEWAY_CLUSTER = "meshgate-gateway"
PROXY_LISTENER = "agent-proxy"
# `sidecar run --strict` (sidecar/strict.py): the listener Envoy opens inside the agent's network
# namespace relays to PROXY_LISTENER through this cluster. It is here, not in the bootstrap,
# because only the control plane knows the sidecar port; unused by non-strict sidecars.
LOOPBACK_CLUSTER = "meshgate-agent-proxy"


def sidecar_resources(
    agent: str,
    gateway_port: int,
    options: TranslateOptions,
    identity: NodeIdentity | None = None,
    trust_domain: str | None = None,
) -> list[Message]:
    """With `identity`, the hop to the gateway is mTLS with the agent's own certificate."""
    host, port = options.gateway_address or ("127.0.0.1", gateway_port)
    cluster = cluster_pb2.Cluster(
        name=GATEWAY_CLUSTER,
        type=cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=duration_pb2.Duration(seconds=5),
    )
    cluster.load_assignment.CopyFrom(single_endpoint(GATEWAY_CLUSTER, host, port))
    routes = route_pb2.RouteConfiguration(
        name=f"agent-{agent}",
        virtual_hosts=[
            rc.VirtualHost(
                name="to-gateway",
                domains=["*"],
                routes=[
                    # a CONNECT is forwarded as CONNECT: the gateway decides on the tunnel
                    rc.Route(
                        match=rc.RouteMatch(connect_matcher=rc.RouteMatch.ConnectMatcher()),
                        route=rc.RouteAction(
                            cluster=GATEWAY_CLUSTER,
                            upgrade_configs=[rc.RouteAction.UpgradeConfig(upgrade_type="CONNECT")],
                        ),
                    ),
                    rc.Route(
                        match=rc.RouteMatch(prefix="/"),
                        route=rc.RouteAction(cluster=GATEWAY_CLUSTER),
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
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="agent",
        route_config=routes,
        http_filters=[router_filter()],
        upgrade_configs=[connect_upgrade()],
        access_log=[stdout_access_log(), sidecar_spool_access_log()],
    )
    listener = http_listener(PROXY_LISTENER, "127.0.0.1", options.sidecar_port, hcm)
    loopback = loopback_cluster(options.sidecar_port)
    if identity is None:
        return [cluster, loopback, listener]
    cluster.transport_socket.name = "envoy.transport_sockets.tls"
    cluster.transport_socket.typed_config.CopyFrom(pack(sidecar_tls()))
    return [
        *identity_secrets(identity, f"spiffe://{trust_domain}/gateway/"),
        cluster,
        loopback,
        listener,
    ]


def loopback_cluster(port: int) -> cluster_pb2.Cluster:
    """The sidecar's own proxy listener as an upstream (for strict mode's namespace listener)."""
    cluster = cluster_pb2.Cluster(
        name=LOOPBACK_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=1),
    )
    cluster.load_assignment.CopyFrom(single_endpoint(LOOPBACK_CLUSTER, "127.0.0.1", port))
    return cluster

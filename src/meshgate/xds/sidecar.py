"""Policy model -> an agent's sidecar: routes that send everything to the gateway.

The sidecar stamps the agent's identity header (overwriting anything the agent sent), so the
gateway's allowlist applies; the agent itself needs only HTTP_PROXY.

The proxy *listener* is not part of the snapshot: each sidecar's launcher puts it in that
sidecar's bootstrap (`proxy_listener`), on an address no other sidecar shares (its own loopback
port without SO_REUSEPORT, or only inside the agent's network namespace in strict mode). A
listener sent over LDS would be the same for every sidecar of an agent, which is how one port
ended up shared by every sidecar on a host. The listener fetches these routes over RDS.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from meshgate.xds.access_log import sidecar_spool_access_log
from meshgate.xds.allowlist import AGENT_HEADER
from meshgate.xds.common import (
    ads,
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


def route_name(agent: str) -> str:
    return f"agent-{agent}"


def sidecar_resources(
    agent: str,
    gateway_port: int,
    options: TranslateOptions,
    identity: NodeIdentity | None = None,
    trust_domain: str | None = None,
) -> list[Message]:
    """With `identity`, the hop to the gateway is mTLS with the agent's own certificate."""
    cluster = gateway_cluster(gateway_port, options, tls=identity is not None)
    routes = agent_routes(agent)
    if identity is None:
        return [cluster, routes]
    return [*identity_secrets(identity, f"spiffe://{trust_domain}/gateway/"), cluster, routes]


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


def agent_routes(agent: str) -> route_pb2.RouteConfiguration:
    """Everything to the gateway, with the agent's identity header stamped."""
    return route_pb2.RouteConfiguration(
        name=route_name(agent),
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
    )
    listener = http_listener(PROXY_LISTENER, host, port, hcm)
    listener.enable_reuse_port.CopyFrom(wrappers_pb2.BoolValue(value=False))
    if netns_path is not None:
        listener.address.socket_address.network_namespace_filepath = netns_path
    return listener

"""Strict mode's pure parts: the bootstrap listener, the snapshot's loopback cluster, errors."""

from __future__ import annotations

import errno

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from meshgate.sidecar import netns_exec
from meshgate.sidecar.bootstrap import BootstrapSpec, build_bootstrap
from meshgate.sidecar.strict import NETNS_LISTENER, NETNS_PROXY_PORT
from meshgate.xds.options import TranslateOptions
from meshgate.xds.sidecar import LOOPBACK_CLUSTER, sidecar_resources


def spec(netns_path: str | None) -> BootstrapSpec:
    return BootstrapSpec(
        "agent/a/1",
        "meshgate-agent",
        "127.0.0.1",
        18000,
        "/run/a/admin.sock",
        netns_path=netns_path,
    )


def test_strict_bootstrap_listens_inside_the_namespace_and_relays_to_the_loopback_cluster() -> None:
    boot = build_bootstrap(spec("/proc/42/ns/net"))
    [listener] = boot.static_resources.listeners
    assert listener.name == NETNS_LISTENER
    addr = listener.address.socket_address
    assert (addr.address, addr.port_value) == ("127.0.0.1", NETNS_PROXY_PORT)
    assert addr.network_namespace_filepath == "/proc/42/ns/net"
    [chain] = listener.filter_chains
    relay = tcp_proxy_pb2.TcpProxy()
    assert chain.filters[0].typed_config.Unpack(relay)
    assert relay.cluster == LOOPBACK_CLUSTER


def test_ordinary_bootstrap_has_no_static_listener() -> None:
    assert not build_bootstrap(spec(None)).static_resources.listeners


def test_every_agent_snapshot_has_the_loopback_cluster_at_the_sidecar_port() -> None:
    resources = sidecar_resources("a", 15001, TranslateOptions(sidecar_port=16080))
    clusters = [r for r in resources if isinstance(r, cluster_pb2.Cluster)]
    [cluster] = [c for c in clusters if c.name == LOOPBACK_CLUSTER]
    endpoint = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint
    assert endpoint.address.socket_address.port_value == 16080


def test_namespace_errors_are_one_line_and_name_the_privilege() -> None:
    assert netns_exec.describe(OSError(errno.EPERM, "Operation not permitted")) == (
        netns_exec.NEEDS_PRIVILEGE
    )
    assert "root or CAP_SYS_ADMIN and CAP_NET_ADMIN" in netns_exec.NEEDS_PRIVILEGE
    other = netns_exec.describe(OSError(errno.ENOSPC, "No space left on device"))
    assert other == "strict mode cannot create a network namespace: No space left on device"


def test_jail_usage_error() -> None:
    assert netns_exec.main([]) == 2
    assert netns_exec.main(["x", "true"]) == 2

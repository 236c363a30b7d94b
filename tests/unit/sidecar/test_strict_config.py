"""The sidecar's own proxy listener (strict and not), and the jail's pure parts."""

from __future__ import annotations

import errno

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from meshgate.sidecar import agent_exec
from meshgate.sidecar.bootstrap import BootstrapSpec, ProxyBinding, build_bootstrap
from meshgate.sidecar.strict import NETNS_PROXY_PORT
from meshgate.xds.options import TranslateOptions
from meshgate.xds.sidecar import PROXY_LISTENER, sidecar_resources


def spec(proxy: ProxyBinding | None) -> BootstrapSpec:
    return BootstrapSpec(
        "agent/a/1", "meshgate-agent", "127.0.0.1", 18000, "/run/a/admin.sock", proxy=proxy
    )


def only_listener(proxy: ProxyBinding) -> listener_pb2.Listener:
    [listener] = build_bootstrap(spec(proxy)).static_resources.listeners
    return listener


def test_strict_proxy_listens_only_inside_the_namespace() -> None:
    listener = only_listener(ProxyBinding("a", "127.0.0.1", NETNS_PROXY_PORT, "/proc/42/ns/net"))
    assert listener.name == PROXY_LISTENER
    addr = listener.address.socket_address
    assert (addr.address, addr.port_value) == ("127.0.0.1", NETNS_PROXY_PORT)
    assert addr.network_namespace_filepath == "/proc/42/ns/net"


def test_each_sidecar_binds_its_own_port_without_reuse_port() -> None:
    """One SO_REUSEPORT port for every sidecar spread agents' connections over each other's
    sidecars (and identities); each bootstrap now owns its listener."""
    listener = only_listener(ProxyBinding("a"))
    addr = listener.address.socket_address
    assert (addr.address, addr.port_value, addr.network_namespace_filepath) == ("127.0.0.1", 0, "")
    assert listener.HasField("enable_reuse_port") and not listener.enable_reuse_port.value
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert hcm.rds.route_config_name == "agent-a"  # routes (and identity stamp) stay dynamic


def test_gateways_have_no_static_listener() -> None:
    assert not build_bootstrap(spec(None)).static_resources.listeners


def test_agent_snapshots_carry_no_listener() -> None:
    resources = sidecar_resources("a", 15001, TranslateOptions())
    assert not [r for r in resources if isinstance(r, listener_pb2.Listener)]


def test_namespace_errors_are_one_line_and_name_the_privilege() -> None:
    assert agent_exec.describe(OSError(errno.EPERM, "Operation not permitted")) == (
        agent_exec.NEEDS_PRIVILEGE
    )
    assert "root or CAP_SYS_ADMIN and CAP_NET_ADMIN" in agent_exec.NEEDS_PRIVILEGE
    other = agent_exec.describe(OSError(errno.ENOSPC, "No space left on device"))
    assert other == "strict mode cannot create a network namespace: No space left on device"


def test_jail_usage_error() -> None:
    assert agent_exec.main([]) == 2
    assert agent_exec.main(["x", "0", "-1", "-1", "true"]) == 2

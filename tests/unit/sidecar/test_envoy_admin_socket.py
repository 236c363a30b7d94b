"""Envoy's admin is a unix socket in a private directory, never a TCP port; outside probes get a
health listener that can change nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshgate.errors import ConfigError
from meshgate.sidecar.bootstrap import (
    HEALTH_LISTENER,
    HEALTH_PATH,
    BootstrapSpec,
    build_bootstrap,
)
from meshgate.sidecar.envoy_admin import ADMIN_SOCKET, SUN_PATH_MAX, AdminSocket, private_dir
from meshgate.sidecar.envoy_process import envoy_command


def spec(**kw: object) -> BootstrapSpec:
    return BootstrapSpec("gateway/g", "meshgate-gateway", "127.0.0.1", 18000, "/s/admin.sock", **kw)  # type: ignore[arg-type]


def test_admin_is_a_unix_socket_readable_by_its_owner_only() -> None:
    admin = build_bootstrap(spec()).admin
    assert admin.address.WhichOneof("address") == "pipe"
    assert admin.address.pipe.path == "/s/admin.sock"
    assert admin.address.pipe.mode == 0o600
    assert not build_bootstrap(spec()).static_resources.listeners  # no health port unless asked


def test_health_listener_answers_one_path_on_loopback_and_is_not_admin() -> None:
    [listener] = build_bootstrap(spec(health_port=15021)).static_resources.listeners
    assert listener.name == HEALTH_LISTENER
    addr = listener.address.socket_address
    assert (addr.address, addr.port_value) == ("127.0.0.1", 15021)
    from envoy.extensions.filters.http.health_check.v3 import health_check_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    health = health_check_pb2.HealthCheck()
    hcm.http_filters[0].typed_config.Unpack(health)
    assert health.pass_through_mode.value is False
    assert {(h.name, h.string_match.exact) for h in health.headers} == {
        (":path", HEALTH_PATH),
        (":method", "GET"),
    }
    [route] = hcm.route_config.virtual_hosts[0].routes
    assert route.direct_response.status == 404  # everything else: nothing there


def test_envoy_logs_at_warn_never_debug() -> None:
    cmd = envoy_command(Path("/x.json"))
    assert cmd[cmd.index("--log-level") + 1] == "warn"


def test_socket_in_the_node_directory_made_private(tmp_path: Path) -> None:
    workdir = tmp_path / "gw"
    workdir.mkdir(mode=0o755)
    os.chmod(workdir, 0o755)  # a directory from an older version
    sock = AdminSocket.in_dir(workdir)
    assert sock.path == workdir.resolve() / ADMIN_SOCKET and not sock.temporary
    assert stat.S_IMODE(os.stat(workdir).st_mode) == 0o700


def test_too_long_for_sun_path_falls_back_to_a_private_temporary_dir(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    sock = AdminSocket.in_dir(deep)
    assert sock.temporary and len(os.fsencode(sock.path)) <= SUN_PATH_MAX
    info = os.stat(sock.path.parent)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(deep).st_mode) == 0o700  # the node dir is still private
    sock.path.touch()
    sock.cleanup()
    assert not sock.path.parent.exists()


def test_a_symlink_is_not_a_private_directory(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match="not a directory owned by"):
        private_dir(tmp_path / "link")

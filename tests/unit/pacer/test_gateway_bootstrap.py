"""A gateway's bootstrap reaches its pacer: a static HTTP/2 cluster to the pacer's socket."""

from __future__ import annotations

import subprocess
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2

from meshgate.pacing import spec
from meshgate.sidecar.bootstrap import BootstrapSpec, build_bootstrap, pacer_socket, write_bootstrap
from meshgate.sidecar.envoy_process import find_envoy


def boot(tmp_path: Path, cluster: str) -> BootstrapSpec:
    return BootstrapSpec(
        "gateway/g1", cluster, "127.0.0.1", 18000, str(tmp_path / "gw" / "admin.sock")
    )


def test_gateway_has_the_pacer_cluster_beside_its_admin_socket(tmp_path: Path) -> None:
    b = build_bootstrap(boot(tmp_path, "meshgate-gateway"))
    (pacer,) = [c for c in b.static_resources.clusters if c.name == spec.PACER_CLUSTER]
    assert pacer.type == cluster_pb2.Cluster.STATIC
    endpoint = pacer.load_assignment.endpoints[0].lb_endpoints[0].endpoint
    assert endpoint.address.pipe.path == str(tmp_path / "gw" / "pacer.sock")
    assert pacer_socket(tmp_path / "gw" / "admin.sock") == tmp_path / "gw" / "pacer.sock"
    assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in (
        pacer.typed_extension_protocol_options
    )


def test_sidecars_have_no_pacer(tmp_path: Path) -> None:
    b = build_bootstrap(boot(tmp_path, "meshgate-agent"))
    assert spec.PACER_CLUSTER not in [c.name for c in b.static_resources.clusters]


def test_envoy_accepts_the_gateway_bootstrap(tmp_path: Path) -> None:
    path = tmp_path / "boot.json"
    write_bootstrap(path, boot(tmp_path, "meshgate-gateway"))
    res = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr

"""The `mesh` fixture (tests/security/hostile_mesh.py holds the mesh itself): one session-scoped
mesh per mode, "up" (`meshgate up`) and "split" (`meshgate serve` + `meshgate gateway`)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import free_port, write_test_pki
from hostile_mesh import (
    AGENT_PYTHON,
    TLS_UPSTREAM,
    UPSTREAMS,
    Mesh,
    _http_ok,
    _listening,
    _start,
    _wait,
    _write_tree,
    start_echo,
)


@pytest.fixture(scope="session", params=["up", "split"])
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    if not Path(AGENT_PYTHON).exists():
        pytest.skip(f"agent scripts need {AGENT_PYTHON}")
    root = Path(tempfile.mkdtemp(prefix=f"mg-{request.param}-"))
    logs = Path(tempfile.mkdtemp(prefix="mg-logs-"))
    # the TLS upstream's own CA: the gateway verifies it (caFile); agents never see it
    ca, cert, key = write_test_pki(logs / "upstream-pki", ["secure.test"], "upstream")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    upstreams = {
        name: start_echo(name, tls if name == TLS_UPSTREAM else None) for name in UPSTREAMS
    }
    gateway_port, xds, admin = free_port(), free_port(), free_port()
    _write_tree(root, upstreams, gateway_port, ca)
    procs = _start(request.param, root, xds, admin, logs)
    mesh = Mesh(
        request.param, root, f"127.0.0.1:{xds}", f"http://127.0.0.1:{admin}", gateway_port,
        upstreams, procs,
    )  # fmt: skip
    try:
        _wait(lambda: _http_ok(f"{mesh.admin_url}/readyz"), "control plane ready", procs, 60)
        _wait(lambda: _listening(gateway_port), "gateway listening", procs, 60)
        yield mesh
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(2)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for echo in upstreams.values():
            echo.server.shutdown()
        if request.node.session.testsfailed:
            print(f"mesh logs kept in {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

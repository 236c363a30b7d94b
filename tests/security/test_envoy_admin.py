"""Issue 17, finding 5: Envoy's admin is out of a hostile agent's reach.

The agent runs any code as a local user and reaches every loopback TCP port. Envoy's admin can
stop the proxy (`POST /quitquitquit`), raise the log level so that the next request writes an
injected API key into a log file (`POST /logging?level=trace`) and dump the configuration
(`GET /config_dump`). So no Envoy meshgate starts (the gateway of `up` / `gateway`, every
`sidecar run`) may have its admin on a TCP port: it is a 0600 unix socket in the launcher's 0700
directory. What Envoy writes (its log, the audit spool) is 0600, and no file under the state
directory ever holds a secret.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from builders import free_port
from envoys import admin_socket_of, envoys_under, tcp_listen_ports
from hostile_mesh import BILLING_SECRET, MESHGATE, Mesh

from meshgate.pacing.spec import LIMITS_SOCKET

pytestmark = pytest.mark.e2e

# What a hostile agent tries on a port; /quitquitquit last, so a success leaves the rest to see.
ADMIN_ATTACKS = (
    ("POST", "/logging?level=trace"),
    ("GET", "/config_dump"),
    ("POST", "/quitquitquit"),
)

ATTACK = """\
import http.client, json, os, urllib.parse
targets = json.loads(__TARGETS__)
own = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])  # this agent's own sidecar
targets.append(["127.0.0.1", own.port])
out = []
for host, port in targets:
    for method, path in __ATTACKS__:
        try:
            c = http.client.HTTPConnection(host, port, timeout=5)
            c.request(method, path)
            r = c.getresponse()
            out.append([port, method, path, r.status, r.read(300).decode(errors="replace")])
        except Exception as e:
            out.append([port, method, path, None, type(e).__name__])
print(json.dumps(out))
"""

HONEST = """\
import json, urllib.request
with urllib.request.urlopen("http://docs.internal/v1/search", timeout=10) as r:
    print(json.dumps({"status": r.status}))
"""

BILLING = """\
import json, urllib.request
with urllib.request.urlopen("http://billing.internal/invoices", timeout=10) as r:
    print(json.dumps({"status": r.status}))
"""


@pytest.fixture
def bystander(mesh: Mesh) -> Iterator[subprocess.Popen[str]]:
    """Another agent's sidecar on this host (`sidecar run` without CMD), with a health port
    (`proc.health_port`)."""
    health_port = free_port()
    proc = subprocess.Popen(
        [
            *MESHGATE, "sidecar", "run", "--agent", "researcher", "--instance", "bystander",
            "--control-plane", mesh.xds, "--health-port", str(health_port),
        ],
        cwd=mesh.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # "sidecar for agent researcher ready; HTTP_PROXY=..."
        seen.append(line)
        if "ready" in line:
            break
    assert proc.poll() is None, "".join(seen)
    proc.health_port = health_port  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.send_signal(2)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mesh_envoys(mesh: Mesh, *extra: subprocess.Popen[str]) -> list[psutil.Process]:
    envoys = envoys_under(*(p.pid for p in mesh.processes), *(p.pid for p in extra))
    assert envoys, "no Envoy under the mesh's processes"
    return envoys


def attack_targets(envoys: list[psutil.Process]) -> list[list[object]]:
    """Every TCP port the Envoys listen on, as the agent reaches it."""
    targets: list[list[object]] = []
    for envoy in envoys:
        for host, port in tcp_listen_ports(envoy):
            targets.append(["127.0.0.1" if host in ("0.0.0.0", "::") else host, port])
    return targets


def run_attack(
    mesh: Mesh, targets: list[list[object]], attacks: tuple[tuple[str, str], ...]
) -> list[list[Any]]:
    """What each attack got, as the agent saw it: [port, method, path, status, body]."""
    code = ATTACK.replace("__TARGETS__", repr(json.dumps(targets))).replace(
        "__ATTACKS__", repr([list(a) for a in attacks])
    )
    results: list[list[Any]] = mesh.agent_python("researcher", code)
    return results


def looks_like_admin(status: int | None, body: str) -> bool:
    """Envoy admin answers these with 200 (`OK`, active loggers, or the config dump)."""
    return status == 200 or "configs" in body or "active loggers" in body


def test_no_envoy_port_answers_admin_and_the_gateway_keeps_serving(
    mesh: Mesh, bystander: subprocess.Popen[str]
) -> None:
    envoys = mesh_envoys(mesh, bystander)
    targets = attack_targets(envoys)
    assert len(targets) >= 2  # the gateway's listener, the bystander's proxy and health port
    results = run_attack(mesh, targets, ADMIN_ATTACKS)
    reached = [r for r in results if looks_like_admin(r[3], r[4])]
    assert not reached, f"Envoy admin answered the agent: {reached}"
    # 404 from a health listener, a policy refusal from a proxy, or no HTTP at all (mTLS)
    assert all(r[3] in (None, 400, 403, 404, 405, 503) for r in results), results
    time.sleep(1)  # a /quitquitquit that worked needs a moment
    assert all(e.is_running() for e in envoys), "an Envoy stopped"
    assert mesh.alive() and bystander.poll() is None
    assert mesh.agent_python("researcher", HONEST) == {"status": 200}


def test_admin_is_a_private_unix_socket(mesh: Mesh, bystander: subprocess.Popen[str]) -> None:
    launcher_uid = os.getuid()  # the fixture runs meshgate as this test's user
    for envoy in mesh_envoys(mesh, bystander):
        path = admin_socket_of(envoy)
        assert path is not None, f"Envoy {envoy.pid} has no admin unix socket"
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600, path
        parent = os.stat(path.parent)
        assert stat.S_IMODE(parent.st_mode) == 0o700, path.parent
        assert info.st_uid == parent.st_uid == launcher_uid


def test_agent_cannot_open_the_admin_socket(mesh: Mesh) -> None:
    [gateway] = mesh_envoys(mesh)
    path = admin_socket_of(gateway)
    assert path is not None
    code = f"""\
import json, os, socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect({str(path)!r})
    got = "connected"
except OSError as e:
    got = type(e).__name__
print(json.dumps({{"uid": os.getuid(), "got": got}}))
"""
    seen = mesh.agent_python("researcher", code)
    if seen["uid"] == 0:
        pytest.skip("the agent runs as root here: no file mode can stop it")
    assert seen["got"] == "PermissionError"


def test_raised_log_level_and_injected_key_never_reach_a_file(mesh: Mesh) -> None:
    """The agent tries to raise Envoy's log level, then the gateway injects a credential: no
    file under the state directory holds it, and Envoy's files are the owner's only."""
    envoys = mesh_envoys(mesh)
    run_attack(mesh, attack_targets(envoys), ADMIN_ATTACKS[:1])
    mesh.upstreams["billing"].clear()
    assert mesh.agent_python("accountant", BILLING) == {"status": 200}
    [hit] = mesh.upstreams["billing"].hits
    assert hit["headers"]["x-api-key"] == BILLING_SECRET  # the gateway did inject it
    time.sleep(1)  # Envoy flushes its log and the spool within a second
    leaked = []
    for path in mesh.state_dir.rglob("*"):
        if (
            path.is_file()
            and not path.is_symlink()
            and BILLING_SECRET.encode() in path.read_bytes()
        ):
            leaked.append(path)
    assert not leaked, f"the injected key is in {leaked}"


def test_envoy_logs_and_spools_are_owner_only(mesh: Mesh) -> None:
    assert mesh.agent_python("researcher", HONEST) == {"status": 200}
    time.sleep(1)  # the spool reaches the disk within Envoy's flush interval
    state = mesh.state_dir
    logs = sorted(state.glob("*.log"))
    spools = sorted(state.glob("*/audit-spool.jsonl*"))
    assert any(p.name.startswith("gateway-") for p in logs), sorted(state.iterdir())
    assert any(p.parent.name.startswith("gateway-") for p in spools), sorted(state.rglob("*"))
    loose = {p: oct(stat.S_IMODE(p.stat().st_mode)) for p in [*logs, *spools]}
    loose = {p: m for p, m in loose.items() if int(m, 8) & 0o077}
    assert not loose, f"readable by others: {loose}"


def test_health_port_says_ready_and_does_nothing_else(bystander: subprocess.Popen[str]) -> None:
    """What Consul and the kubelet probe: GET /healthz/ready, 200 once Envoy serves; any other
    request is 404 (the health_check filter answers itself, nothing reaches admin)."""
    base = f"http://127.0.0.1:{bystander.health_port}"  # type: ignore[attr-defined]
    assert httpx.get(f"{base}/healthz/ready", timeout=5).status_code == 200
    assert httpx.get(f"{base}/ready", timeout=5).status_code == 404
    assert httpx.post(f"{base}/healthz/ready", timeout=5).status_code == 404
    assert httpx.post(f"{base}/healthcheck/fail", timeout=5).status_code == 404
    assert httpx.get(f"{base}/healthz/ready", timeout=5).status_code == 200


def test_agent_cannot_reach_the_pacer(mesh: Mesh) -> None:
    """Issue 19: the pacer (global limits over HTTP, ext_proc: it admits requests and settles
    budgets) listens on unix sockets beside the gateway's admin socket, so a hostile agent can
    neither ask it to admit anything, spend a limit's tokens, nor settle a budget to zero.
    (The control plane's limit store, on the xDS port every agent reaches, refuses any token
    but a gateway's: tests/e2e/test_limit_store_service.py.)"""
    [gateway] = mesh_envoys(mesh)
    admin = admin_socket_of(gateway)
    assert admin is not None
    sockets = [admin.parent / "pacer.sock", admin.parent / LIMITS_SOCKET]
    for path in sockets:
        assert stat.S_ISSOCK(os.stat(path).st_mode), f"the gateway's pacer listens on {path}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    code = f"""\
import json, os, socket
got = []
for path in {[str(p) for p in sockets]!r}:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        got.append("connected")
    except OSError as e:
        got.append(type(e).__name__)
print(json.dumps({{"uid": os.getuid(), "pacer": got}}))
"""
    seen = mesh.agent_python("researcher", code)
    if seen["uid"] == 0:
        pytest.skip("the agent runs as root here: no file mode can stop it")
    assert seen["pacer"] == ["PermissionError", "PermissionError"]

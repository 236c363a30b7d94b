"""The `meshgate` command as a user runs it: real subprocesses, real Envoy, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from builders import free_port
from envoys import envoys_under, wait_live_admin
from harness import write_policy

pytestmark = pytest.mark.e2e

MESHGATE = [sys.executable, "-m", "meshgate.cli"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MESHGATE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def wait_http(url: str, timeout: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            resp = httpx.get(url, timeout=2)
            if resp.status_code == 200:
                return resp
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} not ready in {timeout}s")
        time.sleep(0.1)


AGENT_SCRIPT = """
import json, urllib.error, urllib.request
out = {}
for host in ("nope.example", "alpha.internal"):
    try:
        with urllib.request.urlopen(f"http://{host}/", timeout=10) as r:
            out[host] = [r.status, json.load(r)]
    except urllib.error.HTTPError as e:
        out[host] = [e.code, json.load(e)]
print(json.dumps(out))
"""


def test_up_serves_gateway_status_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    listen, xds, admin = free_port(), free_port(), free_port()
    upstream = free_port()
    write_policy(tmp_path / "policies", listen, {"alpha": upstream})
    proc = subprocess.Popen(
        [
            *MESHGATE,
            "up",
            "--policies",
            str(tmp_path / "policies"),
            "--state-dir",
            str(tmp_path / "state"),
            "--xds-port",
            str(xds),
            "--admin-port",
            str(admin),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{admin}/readyz")
        [gw_admin] = wait_live_admin(proc.pid)  # Envoy's admin: a unix socket, no TCP port
        assert gw_admin.socket.stat().st_mode & 0o777 == 0o600
        [envoy] = envoys_under(proc.pid)
        state = ("--state-dir", str(tmp_path / "state"))  # the admin token is there
        # up requires join tokens; its gateway minted one, kept in an owner-only bootstrap
        boot = tmp_path / "state" / "gateway-local.json"
        assert boot.stat().st_mode & 0o777 == 0o600
        assert "Bearer " in boot.read_text()
        # up defaults to mTLS: without a client certificate the gateway does not talk HTTP
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{listen}/", headers={"Host": "nope.example"})

        status = run("status", "--admin", f"http://127.0.0.1:{admin}", "--format", "json", *state)
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        [node] = data["nodes"]
        assert node["node"] == "gateway/local"
        assert node["types"]["cds"]["policy"] == data["policy"]["version"]
        table = run("status", "--admin", f"http://127.0.0.1:{admin}", *state)
        assert "gateway/local" in table.stdout
        assert "dir:" in table.stdout
        assert "missing secrets" not in table.stdout
        # an ordinary script behind its sidecar: identity from its certificate
        agent = run(
            "sidecar",
            "run",
            "--agent",
            "researcher",
            "--control-plane",
            f"127.0.0.1:{xds}",
            "--state-dir",
            str(tmp_path / "state"),
            "--",
            "/usr/bin/python3",  # CMD runs as nobody: stdlib only
            "-c",
            AGENT_SCRIPT,
        )
        assert agent.returncode == 0, agent.stderr
        got = json.loads(agent.stdout.strip().splitlines()[-1])
        assert got["nope.example"][0] == 403
        assert got["nope.example"][1]["error"] == "unknown_destination"
        assert got["alpha.internal"][0] == 503  # allowed, but nothing listens upstream
        assert got["alpha.internal"][1]["error"] == "upstream_error"
        assert got["alpha.internal"][1]["agent"] == "spiffe://agents.test/agent/researcher"
        ident = run(
            "identity",
            "show",
            "--agent",
            "researcher",
            "--admin",
            f"http://127.0.0.1:{admin}",
            *state,
        )
        assert ident.returncode == 0, ident.stderr
        assert "spiffe://agents.test/agent/researcher" in ident.stdout
        assert "serial" in ident.stdout and "valid until" in ident.stdout
        assert "- alpha any method any path" in ident.stdout
        rotate = run("ca", "rotate", "--admin", f"http://127.0.0.1:{admin}", *state)
        assert rotate.returncode == 0, rotate.stderr
        assert "new intermediate" in rotate.stdout
        plan = run(
            "plan", str(tmp_path / "policies"), "--admin", f"http://127.0.0.1:{admin}", *state
        )
        assert plan.returncode == 0, plan.stderr
        assert "No changes." in plan.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "meshgate stopped." in out
    assert "Traceback" not in err
    assert not envoy.is_running()
    assert not gw_admin.is_live() and not gw_admin.socket.exists()


def test_serve_on_occupied_port_is_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        write_policy(tmp_path / "p", free_port(), {"alpha": 1})
        res = run(
            "serve",
            "--policies",
            str(tmp_path / "p"),
            "--state-dir",
            str(tmp_path / "s"),
            "--admin-port",
            str(port),
            "--xds-port",
            str(free_port()),
        )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert f"cannot listen for admin HTTP on 127.0.0.1:{port}" in res.stderr


def test_missing_envoy_binary_is_clear(tmp_path: Path) -> None:
    res = run("gateway", "--state-dir", str(tmp_path), env={"MESHGATE_ENVOY": "/nonexistent/envoy"})
    assert res.returncode == 1
    assert "MESHGATE_ENVOY=/nonexistent/envoy is not an executable file" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_flag_and_bad_control_plane_address(tmp_path: Path) -> None:
    res = run("serve", "--no-such-flag")
    assert res.returncode == 2
    assert "No such option" in res.stderr
    res = run("gateway", "--control-plane", "nonsense", "--state-dir", str(tmp_path))
    assert res.returncode == 1
    assert "--control-plane must be HOST:PORT" in res.stderr


def test_status_without_control_plane(tmp_path: Path) -> None:
    res = run("status", "--admin", f"http://127.0.0.1:{free_port()}")
    assert res.returncode == 1
    assert "cannot reach the control plane" in res.stderr
    assert "Traceback" not in res.stderr


def test_validate_reports_file_line_and_exit_status(tmp_path: Path) -> None:
    write_policy(tmp_path / "p", 15001, {"alpha": 9000}, agents={"researcher": ["gh"]})
    res = run("validate", str(tmp_path / "p"))
    assert res.returncode == 1
    assert f'{tmp_path / "p" / "agents.yaml"}:8:7: unknown destination "gh"' in res.stderr
    assert "Traceback" not in res.stderr
    write_policy(tmp_path / "q", 15001, {"alpha": 9000})
    ok = run("validate", str(tmp_path / "q"))
    assert ok.returncode == 0
    assert "valid" in ok.stdout


def test_up_on_a_refused_policy_says_why_at_once_and_starts_nothing(tmp_path: Path) -> None:
    write_policy(tmp_path / "p", free_port(), {"alpha": 9000}, agents={"researcher": ["gh"]})
    started = time.monotonic()
    res = run(
        "up", "--policies", str(tmp_path / "p"), "--state-dir", str(tmp_path / "s"),
        "--xds-port", "0", "--admin-port", "0",
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "was refused, so there is nothing to serve" in res.stderr
    assert f'{tmp_path / "p" / "agents.yaml"}:8:7: unknown destination "gh"' in res.stderr
    assert time.monotonic() - started < 20  # not the gateway's 30 s wait for configuration
    assert not (tmp_path / "s" / "gateway-local.json").exists()  # no gateway was started


def test_a_second_up_on_the_gateway_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as first:  # the first mesh's gateway, as far as the port shows
        first.bind(("127.0.0.1", 0))
        first.listen()
        port = first.getsockname()[1]
        write_policy(tmp_path / "p", port, {"alpha": 9000})
        res = run(
            "up", "--policies", str(tmp_path / "p"), "--state-dir", str(tmp_path / "s"),
            "--xds-port", "0", "--admin-port", "0",
        )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"gateway port 127.0.0.1:{port} is taken (another meshgate up?)" in res.stderr
    assert not (tmp_path / "s" / "gateway-local.json").exists()


def test_every_command_has_help() -> None:
    for cmd in (
        "serve",
        "gateway",
        "up",
        "status",
        "validate",
        "plan",
        "lint",
        "token",
        "sidecar",
        "identity",
    ):
        res = run(cmd, "--help")
        assert res.returncode == 0, cmd
        assert "Usage" in res.stdout


def test_serve_tls_and_audit_store_mistakes_are_one_line_and_keep_secrets(tmp_path: Path) -> None:
    write_policy(tmp_path / "p", free_port(), {"alpha": 1})
    common = ["serve", "--policies", str(tmp_path / "p"), "--state-dir", str(tmp_path / "s")]
    ports = ["--xds-port", str(free_port()), "--admin-port", str(free_port())]
    key = tmp_path / "key.pem"
    key.write_text("not used")
    alone = run(*common, *ports, "--xds-key", str(key))  # not silently plaintext
    assert alone.returncode == 1 and "Traceback" not in alone.stderr
    assert "--xds-cert and --xds-key go together" in alone.stderr
    dsn = "postgresql://meshgate:s3cret-pw@127.0.0.1:1/audit"
    bad = run(*common, *ports, "--audit-store", dsn)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    [line] = bad.stderr.strip().splitlines()
    assert "cannot connect to the audit store 127.0.0.1:1/audit: " in line
    assert "s3cret-pw" not in bad.stderr + bad.stdout

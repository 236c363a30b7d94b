"""`meshgate sidecar run --strict`: the agent's only way out is its sidecar, even if it ignores
HTTP_PROXY and dials an allowed upstream's IP directly; without privileges, a clear error."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from builders import free_port
from envoys import envoys_under
from harness import control_plane, gateway, upstream, write_policy

import meshgate
from meshgate.controlplane.server import ControlPlane

pytestmark = pytest.mark.e2e

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="strict mode needs root; CI runs as root")

# Stdlib only: CMD runs as `nobody`, who cannot run the test venv's interpreter (under /root).
AGENT_SCRIPT = """\
import ctypes, json, os, socket, sys, urllib.request, urllib.error
out = {"proxy": os.environ["HTTP_PROXY"], "direct": {}, "uid": os.getuid()}
# an agent trying to climb back into its parent's (the host's) network namespace
libc = ctypes.CDLL(None, use_errno=True)
try:
    fd = os.open(f"/proc/{os.getppid()}/ns/net", os.O_RDONLY)
    back = libc.setns(fd, 0x40000000) == 0  # CLONE_NEWNET
    out["setns"] = "ok" if back else os.strerror(ctypes.get_errno())
except OSError as exc:
    out["setns"] = exc.strerror
cap_eff = int(next(l for l in open("/proc/self/status") if l.startswith("CapEff")).split()[1], 16)
out["cap_sys_admin"], out["cap_net_admin"] = bool(cap_eff >> 21 & 1), bool(cap_eff >> 12 & 1)
for target in sys.argv[1:]:  # dial the upstream itself, ignoring the proxy
    ip, port = target.rsplit(":", 1)
    try:
        socket.create_connection((ip, int(port)), timeout=3).close()
        out["direct"][target] = "connected"
    except OSError as exc:
        out["direct"][target] = exc.strerror or repr(exc)
for name in ("allowed", "forbidden"):  # through the sidecar, via HTTP_PROXY
    try:
        with urllib.request.urlopen(f"http://{name}.internal/work", timeout=10) as r:
            out[name] = [r.status, json.load(r)]
    except urllib.error.HTTPError as e:
        out[name] = [e.code, json.load(e)]
# a CONNECT tunnel request reaches the sidecar too (and the gateway refuses this host)
proxy_host, proxy_port = os.environ["HTTP_PROXY"].removeprefix("http://").split(":")
with socket.create_connection((proxy_host, int(proxy_port)), timeout=10) as s:
    s.sendall(b"CONNECT unknown.example:443 HTTP/1.1\\r\\nHost: unknown.example:443\\r\\n\\r\\n")
    out["connect"] = s.recv(4096).split(b"\\r\\n")[0].decode()
print(json.dumps(out))
sys.exit(7)
"""


def host_ipv4s() -> list[str]:
    """This host's non-loopback IPv4 addresses (SIOCGIFADDR per interface; no `ip` needed)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                got = fcntl.ioctl(sock, 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            ip = socket.inet_ntoa(got[20:24])
            if not ip.startswith("127."):
                found.append(ip)
    return found


def sidecar_cmd(cp: ControlPlane, state: Path, *args: str, strict: bool = True) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meshgate.cli",
        "sidecar",
        "run",
        *(["--strict"] if strict else []),
        "--agent",
        "researcher",
        "--control-plane",
        cp.xds_address,
        "--state-dir",
        str(state),
        "--insecure",  # the harness's control plane serves plaintext xDS
        "--",
        *args,
    ]


def errors(stderr: str) -> list[str]:
    """stderr without --insecure's warning line."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("WARNING")]


async def run(cmd: list[str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@needs_root
async def test_strict_blocks_direct_dials_and_keeps_the_proxy(
    tmp_path: Path, agent_dir: Path
) -> None:
    async with (
        upstream("allowed", host="0.0.0.0") as up,
        upstream("forbidden", host="0.0.0.0") as other,
    ):
        policy = tmp_path / "policies"
        write_policy(
            policy,
            free_port(),
            {"allowed": up.port, "forbidden": other.port},
            agents={"researcher": ["allowed"]},
        )
        targets = [f"{ip}:{up.port}" for ip in ["127.0.0.1", *host_ipv4s()]]
        script = agent_dir / "agent.py"
        script.write_text(AGENT_SCRIPT)
        script.chmod(0o644)
        # mTLS, as `meshgate up` runs it: the strict hop sits in front of the usual sidecar
        state = tmp_path / "state"
        async with control_plane(policy, state, mtls=True) as cp, gateway(cp, tmp_path):
            results: dict[bool, dict[str, Any]] = {}
            for strict in (True, False):
                sc_dir = tmp_path / f"sc-{strict}"
                cmd = sidecar_cmd(cp, sc_dir, "/usr/bin/python3", str(script), *targets,
                                  strict=strict)  # fmt: skip
                code, out, err = await run(cmd)
                assert code == 7, err  # CMD's own exit status, strict or not
                results[strict] = json.loads(out.strip().splitlines()[-1])

    strict, control = results[True], results[False]
    # strict: the agent's loopback is its own (nothing listens there) and no other network exists
    assert strict["direct"].pop(f"127.0.0.1:{up.port}") == "Connection refused"
    assert set(strict["direct"].values()) <= {"Network is unreachable"}
    assert strict["proxy"] == "http://127.0.0.1:15080"
    # it is not root and holds no capability, so it cannot get back out
    assert strict["uid"] != 0
    assert strict["setns"] in {"Permission denied", "Operation not permitted"}
    assert (strict["cap_sys_admin"], strict["cap_net_admin"]) == (False, False)
    # ... while the proxy still works, and still enforces policy
    assert strict["allowed"] == [200, {"upstream": "allowed", "path": "/work"}]
    assert strict["forbidden"][0] == 403
    assert strict["forbidden"][1]["error"] == "egress_denied"
    assert strict["connect"] == "HTTP/1.1 403 Forbidden"
    # the control: without --strict the same direct dials reach the upstream
    assert set(control["direct"].values()) == {"connected"}
    # every CMD, strict or not, runs as another user without capabilities
    assert control["uid"] != 0 and control["setns"] in {
        "Permission denied",
        "Operation not permitted",
    }
    assert len(control["direct"]) == len(targets)
    assert control["allowed"][0] == 200
    assert control["forbidden"][0] == 403
    assert control["connect"] == "HTTP/1.1 403 Forbidden"
    assert not other.hits  # the forbidden upstream was never reached, by any route


@needs_root
async def test_strict_forwards_signals_and_stops_envoy(tmp_path: Path) -> None:
    policy = tmp_path / "policies"
    async with upstream("allowed") as up:
        write_policy(policy, free_port(), {"allowed": up.port})
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path):
            code, _, err = await run(sidecar_cmd(cp, tmp_path / "sc1", "no-such-command-xyz"))
            assert code == 1
            [line] = errors(err)
            # as nobody, a PATH entry under /root is EACCES, not ENOENT; the user is named
            assert line in {
                f"error: cannot run 'no-such-command-xyz' as user 'nobody': {why}"
                for why in ("No such file or directory", "Permission denied")
            }, line

            waiter = (
                "import signal, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))\n"
                "print('up', flush=True)\n"
                "time.sleep(60)\n"
            )
            cmd = sidecar_cmd(cp, tmp_path / "sc2", "/usr/bin/python3", "-c", waiter)
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"up\n"
            [envoy] = envoys_under(proc.pid)
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)
    assert proc.returncode == 42  # SIGTERM reached CMD in its namespace; its status is ours
    assert not envoy.is_running()  # and the sidecar Envoy is gone


def offline_cmd(state: Path, *command: str) -> list[str]:
    """`sidecar run --strict` against a control plane that is not there (fails before it)."""
    return [
        sys.executable,
        "-m",
        "meshgate.cli",
        "sidecar",
        "run",
        "--strict",
        "--agent",
        "researcher",
        "--control-plane",
        f"127.0.0.1:{free_port()}",
        "--state-dir",
        str(state),
        "--insecure",
        *(["--", *command] if command else []),
    ]


NEEDS_PRIVILEGE = (
    "error: strict mode needs root or CAP_SYS_ADMIN and CAP_NET_ADMIN (to create a network "
    "namespace); run without --strict or grant the capabilities"
)


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.parametrize(
    ("dropped", "error"),
    [
        ("-sys_admin,-net_admin", NEEDS_PRIVILEGE),
        ("-sys_admin", NEEDS_PRIVILEGE),  # unshare(CLONE_NEWNET) itself is refused
        ("-net_admin", NEEDS_PRIVILEGE),  # the namespace is made, its loopback cannot go up
        (
            "-setpcap",
            "error: cannot drop CMD's privileges: Operation not permitted; run as root",
        ),
    ],
    ids=["neither", "no-sys-admin", "no-net-admin", "no-setpcap"],
)
async def test_strict_without_capabilities_fails_clearly_before_envoy(
    tmp_path: Path, dropped: str, error: str
) -> None:
    """Root without the capabilities (as in a default container) gets a one-line error."""
    marker = tmp_path / "cmd-ran"
    setpriv = ["setpriv", "--bounding-set", dropped, "--inh-caps", "-all", "--"]
    code, _, err = await run([*setpriv, *offline_cmd(tmp_path / "sc", "touch", str(marker))])
    assert code == 1
    assert errors(err) == [error]
    assert not (tmp_path / "sc").exists()  # failed before any bootstrap was written or Envoy ran
    assert not marker.exists()


@needs_root
async def test_strict_never_runs_cmd_when_envoy_fails(tmp_path: Path) -> None:
    marker = tmp_path / "cmd-ran"
    cmd = offline_cmd(tmp_path / "sc", "touch", str(marker))
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MESHGATE_ENVOY": shutil.which("false") or "/bin/false"},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert errors(err.decode())[0].startswith(
        "error: envoy exited with status 1 before it was ready"
    )
    assert not marker.exists()


async def test_strict_needs_a_command(tmp_path: Path) -> None:
    code, _, err = await run(offline_cmd(tmp_path / "sc"))
    assert code == 1
    assert errors(err) == [
        "error: --strict confines a command: sidecar run --strict --agent NAME -- CMD"
    ]


@needs_root
async def test_strict_jail_never_imports_from_the_working_directory(tmp_path: Path) -> None:
    """The jail runs privileged before confinement; an agent's ./meshgate must not hijack it."""
    marker = tmp_path / "hijacked"
    fake = tmp_path / "cwd" / "meshgate"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cmd = offline_cmd(tmp_path / "sc", "true")
    cmd.insert(1, "-P")  # the CLI itself must not import it either
    ours = str(Path(meshgate.__file__).parents[1])  # this meshgate, whatever the cwd
    pythonpath = os.pathsep.join([ours, *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=fake.parent,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "MESHGATE_ENVOY": shutil.which("false") or "/bin/false",
            "PYTHONPATH": pythonpath,
        },
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "envoy exited with status 1" in err.decode()  # the jail was made, Envoy then failed
    assert not marker.exists()

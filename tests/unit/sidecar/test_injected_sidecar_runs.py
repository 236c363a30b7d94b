"""The injected pod's containers, run locally: the sidecar's own command line starts a real Envoy
against a real control plane (tokens, mTLS and xDS over TLS with an operator's certificate, as in
deploy/), its startup probe turns green, and the app container's injected environment sends
traffic through it under the agent's policy.

Only what a kubelet does is simulated: `meshgate` is this checkout, the mounted token, CA and
state paths are rewritten to temp paths, and `$(MESHGATE_POD_NAME)` is expanded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from builders import free_port, write_test_pki
from e2e.harness import control_plane, upstream, write_policy

from meshgate.controlplane.server import ControlPlane
from meshgate.identity.agent_trust import ca_cert_path
from meshgate.sidecar.injector import (
    AGENT_TRUST_FILE,
    STATE_DIR,
    TOKEN_FILE,
    TRUST_DIR,
    XDS_CA_FILE,
    InjectSettings,
    inject,
)
from meshgate.sidecar.launcher import prepare_envoy

pytestmark = pytest.mark.e2e

POD_NAME = "coder-7d9f8-x2x4q"
APP = """\
import json, urllib.request, urllib.error
out = {}
for host in ("alpha.internal", "beta.internal"):
    try:
        with urllib.request.urlopen(f"http://{host}/work", timeout=10) as r:
            out[host] = r.status
    except urllib.error.HTTPError as e:
        out[host] = e.code
print(json.dumps(out))
"""


@contextlib.asynccontextmanager
async def tls_control_plane(policy: Path, tmp: Path) -> AsyncIterator[tuple[ControlPlane, Path]]:
    """`serve --require-tokens --mtls --xds-tls --xds-cert --xds-key` with an operator's
    certificate (as deploy/control-plane.yaml mounts it); yields it and the CA that signed it."""
    ca, cert, key = write_test_pki(tmp / "xds-pki", ["127.0.0.1", "localhost"], name="xds")
    async with control_plane(
        policy,
        tmp / "cp",
        require_tokens=True,
        mtls=True,
        xds_tls=True,
        xds_cert_file=cert,
        xds_key_file=key,
    ) as cp:
        yield cp, ca


@contextlib.asynccontextmanager
async def tls_gateway(cp: ControlPlane, ca: Path, tmp: Path) -> AsyncIterator[None]:
    """The gateway as `meshgate gateway --token-file --xds-ca` starts it."""
    assert cp.tokens is not None
    token, _ = cp.tokens.create("gateway/egress", 600)
    (tmp / "gateway-token").write_text(token)
    envoy = prepare_envoy(
        "gateway/egress",
        "gateway/egress",
        cp.xds_address,
        tmp / "gateway-state",
        tmp / "gateway-token",
        file_stem="gateway-egress",
        xds_ca=ca,
    )
    await envoy.start()
    try:
        await envoy.wait_ready(30)
        yield
    finally:
        await envoy.stop()


def as_local(command: list[str], tmp: Path, ca: Path) -> list[str]:
    """The container's command as this machine runs it."""
    assert command[0] == "meshgate"
    swap = {
        TOKEN_FILE: str(tmp / "token"),
        STATE_DIR: str(tmp / "sidecar-state"),
        XDS_CA_FILE: str(ca),  # the ConfigMap's ca.crt in the projected volume
        AGENT_TRUST_FILE: str(ca_cert_path(tmp / "cp")),  # meshgate-agent-trust's ca.crt
        TRUST_DIR: str(tmp / "trust"),  # the emptyDir shared with the app containers
    }
    rest = [swap.get(a, a).replace("$(MESHGATE_POD_NAME)", POD_NAME) for a in command[1:]]
    return [sys.executable, "-m", "meshgate.cli", *rest]


def container_env(container: dict[str, Any], tmp: Path) -> dict[str, str]:
    """The app's environment, the trust volume's mount path swapped as `as_local` does."""
    values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return {k: v.replace(TRUST_DIR, str(tmp / "trust")) for k, v in values.items()}


async def probe_until_ok(command: list[str], timeout: float = 40) -> None:
    assert command[0] == "python3"
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        proc = await asyncio.create_subprocess_exec(sys.executable, *command[1:])
        if await proc.wait() == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the sidecar's startup probe never succeeded")
        await asyncio.sleep(0.2)


async def test_injected_sidecar_command_runs_envoy_and_serves_the_app(tmp_path: Path) -> None:
    async with upstream("alpha") as up_a, upstream("beta") as up_b:
        policy = tmp_path / "policies"
        write_policy(
            policy,
            free_port(),
            {"alpha": up_a.port, "beta": up_b.port},
            agents={"coder": ["alpha"], "researcher": ["beta"]},
        )
        async with (
            tls_control_plane(policy, tmp_path) as (cp, ca),
            tls_gateway(cp, ca, tmp_path),
        ):
            assert cp.tokens is not None
            token, _ = cp.tokens.create("agent/coder", 600)
            (tmp_path / "token").write_text(token + "\n")  # as the projected Secret file
            settings = InjectSettings(
                image="meshgate:test",
                control_plane=cp.xds_address,
                sidecar_port=free_port(),
                health_port=free_port(),
            )
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": POD_NAME, "labels": {"meshgate.dev/agent": "coder"}},
                "spec": {"containers": [{"name": "agent", "image": "python:3.12"}]},
            }
            spec = inject(pod, settings)["spec"]
            sidecar, app = spec["initContainers"][0], spec["containers"][0]
            assert XDS_CA_FILE in sidecar["command"]  # the default settings verify the xDS port
            proc = await asyncio.create_subprocess_exec(
                *as_local(sidecar["command"], tmp_path, ca),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await probe_until_ok(sidecar["startupProbe"]["exec"]["command"])
                node = f"agent/coder/{POD_NAME}"
                assert node in {c.node_id for c in cp.registry.connections()}
                env = {"PATH": os.environ.get("PATH", ""), **container_env(app, tmp_path)}
                # the bundle the sidecar shares is there before the app starts, read-only
                (mount,) = [m for m in app["volumeMounts"] if m["mountPath"] == TRUST_DIR]
                assert mount["readOnly"] is True
                bundle = Path(env["SSL_CERT_FILE"]).read_bytes()
                assert bundle.endswith(ca_cert_path(tmp_path / "cp").read_bytes())
                assert env["REQUESTS_CA_BUNDLE"] == env["SSL_CERT_FILE"]
                assert Path(env["NODE_EXTRA_CA_CERTS"]).is_file()
                run = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", APP, env=env, stdout=asyncio.subprocess.PIPE
                )
                out, _ = await asyncio.wait_for(run.communicate(), 30)
                assert json.loads(out) == {"alpha.internal": 200, "beta.internal": 403}
                assert len(up_a.hits) == 1 and not up_b.hits
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)  # what the kubelet sends a sidecar
                _, err = await asyncio.wait_for(proc.communicate(), 15)
            assert proc.returncode == 0, err.decode()

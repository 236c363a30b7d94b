"""An ordinary HTTP client behind `meshgate sidecar run`: identity stamped, policy enforced."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from builders import free_port
from harness import control_plane, gateway, upstream, write_policy

pytestmark = pytest.mark.e2e

AGENT_SCRIPT = """\
import json, sys, httpx
out = {}
with httpx.Client(timeout=10) as c:  # picks up HTTP_PROXY from the environment
    for host in ("alpha.internal", "beta.internal"):
        r = c.get(f"http://{host}/work", headers={"x-meshgate-agent": "someone-else"})
        out[host] = [r.status_code, r.json()]
print(json.dumps(out))
sys.exit(7)
"""


async def test_sidecar_run_stamps_identity_and_returns_command_status(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("alpha") as up_a, upstream("beta") as up_b:
        policy = tmp_path / "policies"
        write_policy(
            policy,
            listen,
            {"alpha": up_a.port, "beta": up_b.port},
            agents={"researcher": ["alpha"], "coder": ["beta"]},
        )
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path):
            script = tmp_path / "agent.py"
            script.write_text(AGENT_SCRIPT)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "meshgate.cli",
                "sidecar",
                "run",
                "--agent",
                "researcher",
                "--control-plane",
                cp.xds_address,
                "--state-dir",
                str(tmp_path / "sc"),
                "--insecure",  # the harness's control plane serves plaintext xDS
                "--insecure-same-user",  # CMD is the test venv's python (isolation: tests/security)
                "--",
                sys.executable,
                str(script),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 7, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["alpha.internal"][0] == 200
    assert result["alpha.internal"][1]["upstream"] == "alpha"
    # the agent claimed another identity; the sidecar overwrote it, so beta is refused
    assert result["beta.internal"][0] == 403
    assert result["beta.internal"][1]["agent"] == "researcher"
    assert len(up_a.hits) == 1
    assert "x-meshgate-agent" not in {k.lower() for k in up_a.hits[0]["headers"]}
    assert not up_b.hits

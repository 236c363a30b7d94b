"""The control plane's embedded limit store, as gateways reach it on the xDS port: gateways
only (a sidecar's join token is refused), and what they spend shows in `budget status`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import httpx
import pytest
from builders import admin_auth
from harness import control_plane, write_policy
from typer.testing import CliRunner

from meshgate.cli import app
from meshgate.pacing.remote_store import RemoteStore
from meshgate.pacing.spec import window_bounds
from meshgate.pacing.store import Charge, StoreUnavailable

BUDGET = """\
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: coder}
spec:
  agent: coder
  budgets: [{name: daily, window: day, requests: 3}]
  egress:
    - destination: alpha
"""


async def test_gateways_spend_and_operators_see_it(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    write_policy(policies, 15001, {"alpha": 9}, agents={"researcher": ["alpha"]})
    (policies / "coder.yaml").write_text(BUDGET)
    async with control_plane(policies, tmp_path / "state", require_tokens=True) as cp:
        assert cp.tokens is not None
        gateway_token, _ = cp.tokens.create("gateway/egress", 600)
        agent_token, _ = cp.tokens.create("agent/coder", 600)
        start, end = window_bounds("day", time.time())
        charge = Charge("agent/coder/daily", 3, 1, start, end)
        async with grpc.aio.insecure_channel(cp.xds_address) as channel:
            await channel.channel_ready()  # as a gateway's pacer does before it serves
            gateway = RemoteStore(channel, metadata=[("authorization", f"Bearer {gateway_token}")])
            for n in range(4):
                held = await gateway.reserve(f"r{n}", [charge], ttl_s=60)
                assert held.admitted == (n < 3)
            await gateway.settle("r0", {"agent/coder/daily": 1})
            # an agent's sidecar token reaches the xDS port too, but never the store
            sidecar = RemoteStore(channel, metadata=[("authorization", f"Bearer {agent_token}")])
            with pytest.raises(StoreUnavailable, match="gateways only"):
                await sidecar.settle("r1", {"agent/coder/daily": 0})
            with pytest.raises(StoreUnavailable):
                await RemoteStore(channel).hit("k", 1, 1)  # no token at all
        async with httpx.AsyncClient(base_url=f"http://{cp.admin_address}") as admin:
            answer = await admin.get(
                "/v1/budgets", params={"agent": "coder"}, headers=admin_auth(cp)
            )
            assert answer.status_code == 200, answer.text
            [row] = answer.json()["budgets"]
            assert (row["budget"], row["spent"], row["reserved"], row["limit"]) == (
                "agent/coder/daily",
                1,
                2,
                3,
            )
            missing = await admin.get(
                "/v1/budgets", params={"agent": "nobody"}, headers=admin_auth(cp)
            )
            assert missing.status_code == 404 and "nobody" in json.loads(missing.text)["error"]
        command = ["budget", "status", "--agent", "coder", "--admin", f"http://{cp.admin_address}"]
        env = {"MESHGATE_ADMIN_TOKEN": str(cp.admin_token), "COLUMNS": "80"}
        result = await asyncio.to_thread(CliRunner().invoke, app, command, env=env)
        assert result.exit_code == 0, result.stderr
        assert "agent/coder/daily" in result.stdout
        assert "3 requests" in result.stdout and "0%" in result.stdout  # 1 spent + 2 reserved

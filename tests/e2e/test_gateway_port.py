"""Two gateways on one host and port (say, two meshes of one user): the second must fail to
bind, visibly, rather than take a share of the agents' connections through SO_REUSEPORT."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from builders import free_port
from harness import MESH, control_plane, gateway, upstream, via_gateway

from meshgate.cli.gateway import rejected_listeners

pytestmark = pytest.mark.e2e

POLICY = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: docs}}
spec: {{host: docs.internal, port: 80, tls: none, address: "127.0.0.1:{port}"}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: researcher}}
spec: {{agent: researcher, egress: [{{destination: docs}}]}}
"""


async def test_a_second_gateway_on_a_taken_port_is_refused(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("docs") as up:
        policy = tmp_path / "policies"
        policy.mkdir()
        (policy / "mesh.yaml").write_text(MESH.format(port=listen))
        (policy / "rules.yaml").write_text(POLICY.format(port=up.port))
        async with (
            control_plane(policy, tmp_path / "state") as cp,
            gateway(cp, tmp_path, "first"),
            gateway(cp, tmp_path, "second") as second,
        ):
            refused: list[str] = []
            for _ in range(50):
                refused = await asyncio.to_thread(rejected_listeners, second.admin)
                if refused:
                    break
                await asyncio.sleep(0.1)
            assert refused and "in use" in " ".join(refused).lower(), refused
            # and the first keeps every connection
            for _ in range(10):
                assert (await via_gateway(listen, "docs.internal", "/")).status_code == 200

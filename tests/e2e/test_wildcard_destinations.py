"""A wildcard destination with MCP tool rules: its body buffer and MCP parser act on one label
under it only, never on a destination named exactly under it (an ordinary HTTP tool keeps its
whole-body limit off, a passthrough tunnel is not held for a body)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from builders import free_port
from harness import MESH, control_plane, gateway, upstream, via_gateway

pytestmark = pytest.mark.e2e

POLICY = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: tenants-mcp}}
spec: {{host: "*.tenants.internal", port: 80, tls: none, address: "127.0.0.1:{port}"}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: audit-tenant}}
spec: {{host: audit.tenants.internal, port: 80, tls: none, address: "127.0.0.1:{port}"}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: vault-tenant}}
spec: {{host: vault.tenants.internal, port: 80, tls: passthrough, address: "127.0.0.1:{port}"}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: researcher}}
spec:
  agent: researcher
  egress:
    - destination: tenants-mcp
      paths: [/mcp]
      tools: [read_file]
    - destination: audit-tenant
    - destination: vault-tenant
"""
BIG = b"x" * (2 << 20)  # over the MCP body limit (1 MiB)


async def connect(port: int, authority: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        "x-meshgate-agent: researcher\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        return (await asyncio.wait_for(reader.readline(), 5)).decode()
    finally:
        writer.close()


async def test_a_wildcards_mcp_filters_leave_names_other_destinations_hold(
    tmp_path: Path,
) -> None:
    listen = free_port()
    async with upstream("tools") as up:
        policy = tmp_path / "policies"
        policy.mkdir()
        (policy / "mesh.yaml").write_text(MESH.format(port=listen))
        (policy / "rules.yaml").write_text(POLICY.format(port=up.port))
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path):
            del cp
            # the exactly named HTTP tool: a 2 MiB body passes (no MCP buffer, no 413)
            r = await via_gateway(listen, "audit.tenants.internal", "/upload", "POST", content=BIG)
            assert r.status_code == 200, r.text
            assert len(up.hits[-1]["body"]) == len(BIG)
            # the exactly named passthrough destination: its tunnel opens at once
            assert " 200 " in await connect(listen, "vault.tenants.internal:80")
            # one label under the wildcard: the MCP reading applies (too large, or unparsed)
            r = await via_gateway(
                listen,
                "acme.tenants.internal",
                "/mcp",
                "POST",
                content=BIG,
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code in (403, 413), r.text

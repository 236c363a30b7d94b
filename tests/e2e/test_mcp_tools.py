"""MCP tool allowlists: the gateway reads the JSON-RPC body and admits only listed tools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from builders import free_port
from harness import MESH, control_plane, gateway, upstream, via_gateway

pytestmark = pytest.mark.e2e

POLICY = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: code-mcp}}
spec:
  host: mcp.internal
  port: 80
  tls: none
  address: 127.0.0.1:{port}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: coder}}
spec:
  agent: coder
  egress:
    - destination: code-mcp
      methods: [POST]
      paths: ["/mcp"]
      tools: [read_file, search_code]
"""


def rpc(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}


async def test_only_listed_tools_reach_the_mcp_server(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("mcp") as up:
        policy = tmp_path / "policies"
        policy.mkdir()
        (policy / "mesh.yaml").write_text(MESH.format(port=listen))
        (policy / "rules.yaml").write_text(POLICY.format(port=up.port))
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path):

            async def call(body: dict[str, Any], host: str = "mcp.internal") -> int:
                r = await via_gateway(listen, host, "/mcp", "POST", agent="coder", json=body)
                return r.status_code

            assert await call(rpc("initialize", {"protocolVersion": "2025-06-18"})) == 200
            assert await call(rpc("tools/list")) == 200
            assert await call(rpc("tools/call", {"name": "read_file", "arguments": {}})) == 200
            assert await call(rpc("tools/call", {"name": "search_code", "arguments": {}})) == 200
            assert await call(rpc("tools/call", {"name": "write_file", "arguments": {}})) == 403
            assert await call(rpc("tools/call", {"name": "read_file_x"})) == 403
            denied = await via_gateway(
                listen,
                "mcp.internal",
                "/mcp",
                "POST",
                agent="coder",
                json=rpc("tools/call", {"name": "delete_repo"}),
            )
            assert denied.json()["error"] == "tool_denied"
            assert denied.json()["tool"] == "delete_repo"
            assert [h["body"] for h in up.hits if "write_file" in h["body"]] == []
            assert len(up.hits) == 4
            # the tool parser runs for the host in any case, as Envoy's virtual hosts match it
            read = rpc("tools/call", {"name": "read_file", "arguments": {}})
            assert await call(read, host="MCP.Internal") == 200
            write = rpc("tools/call", {"name": "write_file", "arguments": {}})
            assert await call(write, host="MCP.Internal") == 403

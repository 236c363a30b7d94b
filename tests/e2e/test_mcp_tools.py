"""MCP tool allowlists: the gateway reads the JSON-RPC body and admits only listed tools.

A refused call is answered as MCP expects (HTTP 200, a tool result with `isError` naming the
tool), so the caller's model reads why; it never reaches the server."""

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
                """200: forwarded; 403: refused (the answer is a tool result with isError)."""
                r = await via_gateway(listen, host, "/mcp", "POST", agent="coder", json=body)
                if r.status_code == 200 and r.json().get("result", {}).get("isError"):
                    assert "refused by meshgate" in r.json()["result"]["content"][0]["text"]
                    return 403
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
            assert denied.status_code == 200 and denied.json()["id"] == 1
            assert denied.json()["result"]["isError"] is True
            text = denied.json()["result"]["content"][0]["text"]
            assert 'tool "delete_repo" is not allowed for agent coder' in text
            assert "read_file, search_code" in text  # what it may call instead
            assert [h["body"] for h in up.hits if "write_file" in h["body"]] == []
            assert len(up.hits) == 4
            # the tool parser runs for the host in any case, as Envoy's virtual hosts match it
            read = rpc("tools/call", {"name": "read_file", "arguments": {}})
            assert await call(read, host="MCP.Internal") == 200
            write = rpc("tools/call", {"name": "write_file", "arguments": {}})
            assert await call(write, host="MCP.Internal") == 403

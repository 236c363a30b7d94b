"""MCP through a real gateway (`meshgate gateway`'s Envoy and pacer) with the official `mcp` SDK
as client and server (streamable HTTP, JSON and SSE answers, the 2025-06-18 handshake and the
2026-07-28 revision with its Mcp-Method/Mcp-Name headers): the pacer checks arguments, answers
refusals as tool results the model reads, filters tools/list, and the audit records the
method, tool and arguments digest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import uvicorn
from builders import free_port
from harness import MESH, audit_records, control_plane, sidecar, until
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from meshgate.cli.gateway import start_gateway
from meshgate.mcp.canonical import canonical

pytestmark = pytest.mark.e2e

POLICY = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: issues}}
spec:
  host: issues.internal
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
    - destination: issues
      paths: ["/mcp"]
      tools:
        - list_issues
        - name: create_issue
          arguments:
            repo: {{pattern: "^acme/[a-z0-9._-]+$"}}
            title: {{maxLength: 20}}
"""

CALLED: list[tuple[str, dict[str, Any]]] = []


def mcp_server() -> MCPServer:
    server: MCPServer = MCPServer("issues")

    @server.tool()
    def list_issues(repo: str) -> str:
        CALLED.append(("list_issues", {"repo": repo}))
        return f"no issues in {repo}"

    @server.tool()
    def create_issue(repo: str, title: str) -> str:
        CALLED.append(("create_issue", {"repo": repo, "title": title}))
        return f"created {title!r} in {repo}"

    @server.tool()
    def delete_repo(repo: str) -> str:
        CALLED.append(("delete_repo", {"repo": repo}))
        return "deleted"

    return server


@contextlib.asynccontextmanager
async def serve(json_response: bool) -> AsyncIterator[int]:
    app = mcp_server().streamable_http_app(
        json_response=json_response,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started, timeout=10, what="MCP server")
    try:
        yield port
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def mesh(
    tmp_path: Path, json_response: bool, extra: str = ""
) -> AsyncIterator[tuple[Any, int]]:
    listen = free_port()
    async with serve(json_response) as up:
        policy = tmp_path / "policies"
        policy.mkdir()
        (policy / "mesh.yaml").write_text(MESH.format(port=listen))
        (policy / "rules.yaml").write_text(POLICY.format(port=up) + extra)
        async with control_plane(policy, tmp_path / "state") as cp:
            gw = await start_gateway(
                cp.xds_address, "egress", tmp_path / "gw", False, 1, wait_ready=True, insecure=True
            )
            try:
                await until(lambda: _listening(listen), timeout=30, what="gateway listener")
                yield cp, listen
            finally:
                await gw.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def client(listen: int, mode: str) -> Client:
    """The SDK client as an agent behind its sidecar: Host names the tool, the header the agent."""
    http = httpx2.AsyncClient(
        headers={"Host": "issues.internal", "x-meshgate-agent": "coder"}, timeout=20
    )
    transport = streamable_http_client(f"http://127.0.0.1:{listen}/mcp", http_client=http)
    return Client(transport, mode=mode)  # type: ignore[arg-type]


def text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.parametrize(
    ("json_response", "mode"), [(True, "legacy"), (False, "legacy"), (False, "2026-07-28")]
)
async def test_sdk_calls_through_the_gateway(
    tmp_path: Path, json_response: bool, mode: str
) -> None:
    CALLED.clear()
    async with mesh(tmp_path, json_response) as (cp, listen):
        async with client(listen, mode) as c:
            # tools/list shows only what the agent may call (delete_repo is hidden)
            listed = await c.list_tools()
            assert sorted(t.name for t in listed.tools) == ["create_issue", "list_issues"]
            # allowed, with allowed arguments: the server runs it
            ok = await c.call_tool("create_issue", {"repo": "acme/web", "title": "fix login"})
            assert not ok.is_error and "created" in text_of(ok)
            # refused for its arguments: a tool result the model reads, naming tool, rule, remedy
            bad = await c.call_tool("create_issue", {"repo": "evil/web", "title": "x"})
            assert bad.is_error
            message = text_of(bad)
            assert 'tool "create_issue"' in message and 'argument "repo"' in message
            assert "rule 1 of agent coder" in message and "evil" not in message
            # a tool no rule names: refused the same way, the allowed tools listed
            denied = await c.call_tool("delete_repo", {"repo": "acme/web"})
            assert denied.is_error and 'tool "delete_repo" is not allowed' in text_of(denied)
            assert "create_issue, list_issues" in text_of(denied)
            assert [name for name, _ in CALLED] == ["create_issue"]
        records = await until(lambda: _mcp_records(cp), timeout=15, what="audit records")
        by_tool = {(r.mcp_tool, r.decision, r.reason) for r in records}
        assert ("create_issue", "allowed", "") in by_tool
        assert ("create_issue", "denied", "argument_refused") in by_tool
        assert ("delete_repo", "denied", "tool_denied") in by_tool
        # every record says which policy decided, refusals the pacer answered included
        version = cp.policy.model.version
        assert {(r.mcp_tool, r.reason, r.policy_version) for r in records} >= {
            ("create_issue", "", version),
            ("create_issue", "argument_refused", version),
            ("delete_repo", "tool_denied", version),
        }
        assert {r.policy_version for r in records} == {version}
        allowed = next(
            r for r in records if r.mcp_tool == "create_issue" and r.decision == "allowed"
        )
        digest = hashlib.sha256(canonical({"repo": "acme/web", "title": "fix login"})).hexdigest()
        assert allowed.mcp_args_digest == f"sha256:{digest}"
        assert "acme/web" not in json.dumps([str(r) for r in records])


SHADOW = """\
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: coder-next}
spec:
  agent: coder
  mode: shadow
  egress:
    - destination: issues
      paths: ["/mcp"]
      tools:
        - name: create_issue
          arguments:
            repo: {pattern: "^acme/[a-z0-9._-]+$"}
            title: {maxLength: 5}
"""


async def test_shadow_tool_rules_are_recorded_never_enforced(tmp_path: Path) -> None:
    """A candidate policy that drops list_issues and shortens titles: every call still runs
    as the enforced rules say; each record tells what the candidate would have done."""
    CALLED.clear()
    async with mesh(tmp_path, True, SHADOW) as (cp, listen):
        async with client(listen, "legacy") as c:
            long = await c.call_tool("create_issue", {"repo": "acme/web", "title": "fix login"})
            listed = await c.call_tool("list_issues", {"repo": "acme/web"})
            short = await c.call_tool("create_issue", {"repo": "acme/web", "title": "fix"})
            assert not (long.is_error or listed.is_error or short.is_error)
        assert [name for name, _ in CALLED] == ["create_issue", "list_issues", "create_issue"]
        records = await until(
            lambda: (lambda r: r if r and len([x for x in r if x.mcp_method == "tools/call"]) >= 3
                     else None)(_mcp_records(cp)),
            timeout=15,
            what="audit records",
        )  # fmt: skip
        calls = sorted(
            (r for r in records if r.mcp_method == "tools/call"), key=lambda r: r.timestamp
        )
        got = [(r.mcp_tool, r.decision, r.shadow_decision, r.shadow_reason) for r in calls]
        assert got[0][:3] == ("create_issue", "allowed", "denied")
        assert got[0][3].startswith('argument_refused: tool "create_issue": argument "title"')
        assert got[1] == ("list_issues", "allowed", "denied", "tool_denied")
        assert got[2] == ("create_issue", "allowed", "allowed", "")


def _mcp_records(cp: Any) -> list[Any] | None:
    got = [r for r in audit_records(cp) if r.mcp_tool]
    return got if len(got) >= 3 else None


async def test_header_mismatch_and_duplicate_keys_are_refused(tmp_path: Path) -> None:
    CALLED.clear()
    async with mesh(tmp_path, json_response=True) as (cp, listen):

        async def post(body: str, **headers: str) -> httpx.Response:
            sent = {
                "Host": "issues.internal",
                "x-meshgate-agent": "coder",
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                **headers,
            }
            async with httpx.AsyncClient(timeout=10) as h:
                return await h.post(f"http://127.0.0.1:{listen}/mcp", content=body, headers=sent)

        call = {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "list_issues", "arguments": {"repo": "acme/web"}},
        }
        # Mcp-Name says one tool, the body calls another
        r = await post(json.dumps(call), **{"Mcp-Method": "tools/call", "Mcp-Name": "other"})
        assert r.status_code == 400 and r.json()["error"]["code"] == -32020
        assert r.json()["id"] == 7
        r = await post(json.dumps(call), **{"Mcp-Method": "tools/list"})
        assert r.status_code == 400 and "Mcp-Method" in r.json()["error"]["message"]
        # a duplicate key: Envoy's parser keeps the last, a server may keep the first
        dup = json.dumps(call)[:-1] + ', "id": 8}'
        r = await post(dup)
        assert r.status_code == 400 and r.json()["error"]["code"] == -32600
        assert "appears twice" in r.json()["error"]["message"]
        assert CALLED == []

        def reasons() -> set[str] | None:
            got = {x.reason for x in audit_records(cp) if x.decision == "denied"}
            return got if len(got) >= 2 else None  # all three refusals shipped

        got = await until(reasons, timeout=15, what="audit records")
        assert "mcp_header_mismatch" in got
        assert any(x.startswith("mcp_unparsed") for x in got)


async def test_sdk_through_the_agents_sidecar(tmp_path: Path) -> None:
    """The agent as it really runs: its HTTP proxy is its sidecar, which stamps its identity
    and forwards to the gateway (SSE answers, the 2026-07-28 revision)."""
    CALLED.clear()
    async with (
        mesh(tmp_path, json_response=False) as (cp, _),
        sidecar(cp, tmp_path, "coder") as proxy,
    ):
        http = httpx2.AsyncClient(proxy=proxy, timeout=20)
        transport = streamable_http_client("http://issues.internal/mcp", http_client=http)
        async with Client(transport, mode="2026-07-28") as c:  # type: ignore[arg-type]
            listed = await c.list_tools()
            assert sorted(t.name for t in listed.tools) == ["create_issue", "list_issues"]
            ok = await c.call_tool("list_issues", {"repo": "acme/web"})
            assert not ok.is_error and "no issues" in text_of(ok)
            bad = await c.call_tool("create_issue", {"repo": "acme/web", "title": "x" * 21})
            assert bad.is_error and 'argument "title" must be at most 20' in text_of(bad)
        assert [name for name, _ in CALLED] == ["list_issues"]

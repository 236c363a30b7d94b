"""A hostile agent tries to get a forbidden MCP tool call past the gateway's tool rule.

`gw-mcp` may call only `read_file` on mcp.internal/mcp (any HTTP method). Every request below
carries a `tools/call` of `write_file` in some shape the MCP filter may not read: other headers,
too big a body, duplicate keys, a GET or DELETE with a body, chunked framing, ... None may reach
the MCP server; each is refused with a JSON reason and audited as denied. Honest MCP traffic
(initialize, tools/list, read_file, the SSE GET, the session DELETE) still passes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from gateway_agent import AGENT_LIB

if TYPE_CHECKING:  # the fixture comes from tests/security/conftest.py; a plain import of
    from hostile_mesh import Mesh

pytestmark = pytest.mark.e2e

SCRIPT = (
    AGENT_LIB
    + r"""
URL = "http://mcp.internal/mcp"
MCP = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def rpc(method, **params):
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})


WRITE = rpc("tools/call", name="write_file", arguments={"path": "/etc/passwd"})
READ = rpc("tools/call", name="read_file", arguments={"path": "README.md"})
PAD = "x" * (1024 * 1024 + 10)
ATTACKS = {
    "text/plain": ("POST", WRITE, {"Content-Type": "text/plain", "Accept": MCP["Accept"]}, False),
    "no Accept": ("POST", WRITE, {"Content-Type": "application/json"}, False),
    "Accept json only": ("POST", WRITE, {**MCP, "Accept": "application/json"}, False),
    "Content-Type case": ("POST", WRITE, {**MCP, "Content-Type": "Application/JSON"}, False),
    "no Content-Type": ("POST", WRITE, {"Accept": MCP["Accept"]}, False),
    "batch": ("POST", "[" + WRITE + "]", MCP, False),
    "no jsonrpc member": ("POST", WRITE.replace('"jsonrpc": "2.0", ', ""), MCP, False),
    "byte order mark": ("POST", "\ufeff" + WRITE, MCP, False),
    "deep nesting": ("POST", '{"x":' + "[" * 3000 + "]" * 3000 + "," + WRITE[1:], MCP, False),
    "over the body limit": ("POST", WRITE[:-1] + ', "pad": "' + PAD + '"}', MCP, False),
    "call first, pad, then another": (
        "POST", READ[:-1] + ', "pad": "' + PAD + '", "params": {"name": "write_file"}}', MCP, False,
    ),
    "duplicate params": ("POST", READ[:-1] + ', "params": {"name": "write_file"}}', MCP, False),
    "escaped name": ("POST", WRITE.replace("write_file", "write\\u005ffile"), MCP, False),
    "chunked": ("POST", WRITE, MCP, True),
    "chunked text/plain": ("POST", WRITE, {"Content-Type": "text/plain"}, True),
    "GET with a body": ("GET", WRITE, {"Accept": "text/event-stream"}, False),
    "GET chunked body": ("GET", WRITE, {"Accept": "text/event-stream"}, True),
    "DELETE with a body": ("DELETE", WRITE, {"mcp-session-id": "s1", **MCP}, False),
    "PUT": ("PUT", WRITE, MCP, False),
}
HONEST = {
    "initialize": ("POST", rpc("initialize", protocolVersion="2025-06-18"), MCP, False),
    "tools/list": ("POST", rpc("tools/list"), MCP, False),
    "read_file": ("POST", READ, MCP, False),
    "chunked read_file": ("POST", READ, MCP, True),
    "SSE stream": ("GET", None, {"Accept": "text/event-stream"}, False),
    "end session": ("DELETE", None, {"mcp-session-id": "s1"}, False),
}
out = {}
for group in (ATTACKS, HONEST):
    for name, (method, body, headers, chunked) in group.items():
        r = send(method, URL, body, {**headers, "x-test-case": name}, chunked)
        out[name] = {"status": r["status"], "body": r["body"]}
print(json.dumps(out))
"""
)

ATTACKS = 19
REFUSALS = {"mcp_unparsed", "tool_denied", "body_too_large"}


def refusal(r: dict[str, Any]) -> bool:
    """Refused, with a reason: by Envoy's routes and filters (403/413 and a JSON reason), or by
    the gateway's pacer as MCP answers (a JSON-RPC error, or a tool result with isError)."""
    body = r["body"]
    if not isinstance(body, dict):
        return False
    if r["status"] in (403, 413):
        return body.get("error") in REFUSALS and bool(body.get("reason"))
    if r["status"] == 400 and body.get("jsonrpc") == "2.0":
        return "refused by meshgate" in body["error"]["message"]
    if r["status"] == 200 and body.get("jsonrpc") == "2.0":
        result = body.get("result", {})
        return result.get("isError") is True and "refused by meshgate" in str(result)
    return False


def test_forbidden_tool_calls_fail_closed(mesh: Mesh) -> None:
    mcp = mesh.upstreams["mcp"]
    mcp.clear()
    seen: dict[str, Any] = mesh.agent_python("gw-mcp", SCRIPT, timeout=120)
    attacks = dict(list(seen.items())[:ATTACKS])
    honest = dict(list(seen.items())[ATTACKS:])

    reached = {h["headers"].get("x-test-case") for h in mcp.hits}
    assert reached == set(honest), f"reached the MCP server: {sorted(reached - set(honest))}"
    assert not [h for h in mcp.hits if "write_file" in h["body"]]
    for name, r in attacks.items():
        assert refusal(r), (name, r)
    # Envoy's parser keeps the last "params" (write_file), so the agent's refusal route took
    # it; the pacer reads bodies strictly and refuses the duplicate key itself
    dup = attacks["duplicate params"]
    assert dup["status"] == 400 and dup["body"]["error"]["code"] == -32600
    assert "appears twice" in dup["body"]["error"]["message"]
    assert attacks["over the body limit"]["status"] == 413
    assert attacks["text/plain"]["body"]["error"] == "mcp_unparsed"
    assert all(r["status"] == 200 for r in honest.values()), honest

    # every refusal is in the audit log, denied with its reason; calls name their tool
    denied = mesh.audit("--agent", "gw-mcp", "--decision", "denied", "--limit", "1000",
                        min_count=ATTACKS)  # fmt: skip
    assert len(denied) >= ATTACKS
    assert all(r["reason"].split(":")[0] in REFUSALS for r in denied), denied
    writes = mesh.audit("--agent", "gw-mcp", "--tool", "write_file", min_count=2)
    assert writes and all(r["decision"] == "denied" for r in writes)
    assert all(r["mcp_method"] == "tools/call" for r in writes)
    reads = mesh.audit("--agent", "gw-mcp", "--tool", "read_file", "--decision", "allowed",
                       min_count=2)  # fmt: skip
    assert len(reads) >= 2
    listed = [r for r in mesh.audit("--agent", "gw-mcp", "--limit", "1000")
              if r["mcp_method"] == "tools/list"]  # fmt: skip
    assert listed and listed[0]["decision"] == "allowed"
    assert json.dumps(denied).find("/etc/passwd") == -1  # bodies never reach the audit log

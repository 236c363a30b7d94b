"""A destination with a wildcard host (`*.wild.internal`) and MCP tool rules.

The gateway's MCP body reader and its buffer are chosen by the request's authority; Envoy picks
the destination's virtual host by the wildcard, so they must be chosen the same way (they were
not: every honest call was refused as mcp_unparsed, and a chunked one met only the pacer).
`sec-wild` may call read_file on any *.wild.internal/mcp: an honest call passes, a forbidden
one, however framed, does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from gateway_agent import AGENT_LIB

if TYPE_CHECKING:  # the fixture comes from tests/security/conftest.py
    from hostile_mesh import Mesh

pytestmark = pytest.mark.e2e

SCRIPT = (
    AGENT_LIB
    + r"""
MCP = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def rpc(method, **params):
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})


READ = rpc("tools/call", name="read_file", arguments={"path": "README.md"})
WRITE = rpc("tools/call", name="write_file", arguments={"path": "/etc/passwd"})
CASES = {
    "read_file": ("http://a.wild.internal/mcp", READ, False),
    "read_file, upper case host": ("http://B.WILD.internal/mcp", READ, False),
    "tools/list": ("http://c.wild.internal/mcp", rpc("tools/list"), False),
    "write_file": ("http://a.wild.internal/mcp", WRITE, False),
    "write_file chunked": ("http://a.wild.internal/mcp", WRITE, True),
    "write_file, two labels": ("http://x.y.wild.internal/mcp", WRITE, False),
}
out = {}
for name, (url, body, chunked) in CASES.items():
    r = send("POST", url, body, {**MCP, "x-test-case": name}, chunked)
    out[name] = {"status": r["status"], "body": r["body"]}
print(json.dumps(out))
"""
)


def test_a_wildcard_destination_reads_tool_calls(mesh: Mesh) -> None:
    mcp = mesh.upstreams["mcp"]
    mcp.clear()
    seen: dict[str, Any] = mesh.agent_python("sec-wild", SCRIPT, timeout=120)
    for name in ("read_file", "read_file, upper case host"):
        assert seen[name]["status"] == 200, (name, seen[name])
        assert seen[name]["body"].get("upstream") == "mcp", (name, seen[name])
    # tools/list is forwarded and its answer read: the echo server's is no tool list, so the
    # gateway shows an error instead (it shows no list it cannot vouch for)
    listed = seen["tools/list"]["body"]
    assert "tools/list answer could not be read" in listed["error"]["message"], listed
    for name in ("write_file", "write_file chunked", "write_file, two labels"):
        r = seen[name]
        assert r["status"] in (200, 400, 403), (name, r)
        # two labels under a one-label wildcard: no destination at all
        refusals = ("unknown_destination",) if "two labels" in name else ()
        assert "refused by meshgate" in str(r["body"]) or r["body"].get("error") in (
            "tool_denied",
            "mcp_unparsed",
            *refusals,
        ), (name, r)
    reached = {h["headers"].get("x-test-case"): h for h in mcp.hits}
    assert set(reached) == {"read_file", "read_file, upper case host", "tools/list"}, reached
    assert not [h for h in mcp.hits if "write_file" in h["body"]]


TWO_LABELS = (
    AGENT_LIB
    + r"""
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                   "params": {"name": "read_file", "arguments": {"path": "README.md"}}})
MCP = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
       "x-test-case": "two labels"}
r = send("POST", "http://x.y.wild.internal/mcp", body, MCP)
print(json.dumps({"status": r["status"], "body": r["body"]}))
"""
)


def test_a_wildcard_stands_for_one_label_only(mesh: Mesh) -> None:
    mcp = mesh.upstreams["mcp"]
    seen: dict[str, Any] = mesh.agent_python("sec-wild", TWO_LABELS, timeout=120)
    assert not [h for h in mcp.hits if h["headers"].get("x-test-case") == "two labels"]
    assert seen["status"] == 403 and seen["body"]["error"] == "unknown_destination", seen

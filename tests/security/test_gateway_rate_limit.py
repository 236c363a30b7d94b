"""A hostile agent spreads requests over a rule's paths (and MCP routes) to multiply its limit.

`gw-rl` has `GET /a, /b` at 3 a minute on quota.internal, and an MCP tool rule at 3 a minute:
each rule is one bucket per agent, whichever of its paths or routes a request takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from gateway_agent import AGENT_LIB

if TYPE_CHECKING:  # the fixture comes from tests/security/conftest.py; a plain import of
    from conftest import Mesh  # "conftest" can name another directory's conftest in a mixed run

pytestmark = pytest.mark.e2e

SCRIPT = (
    AGENT_LIB
    + r"""
MCP = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
def rpc(method, **params):
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
out = {"paths": [], "mcp": []}
for path in ["/a", "/b"] * 4:
    r = send("GET", "http://quota.internal" + path)
    out["paths"].append({"status": r["status"], "headers": r["headers"], "body": r["body"]})
calls = [
    ("POST", rpc("initialize"), MCP),
    ("POST", rpc("tools/list"), MCP),
    ("POST", rpc("tools/call", name="read_file"), MCP),
    ("GET", None, {"Accept": "text/event-stream"}),
] * 2
for method, body, headers in calls:
    r = send(method, "http://mcp.internal/mcp", body, headers)
    out["mcp"].append({"status": r["status"], "headers": r["headers"], "body": r["body"]})
print(json.dumps(out))
"""
)


def test_a_rule_is_one_bucket_whatever_its_routes(mesh: Mesh) -> None:
    seen: dict[str, Any] = mesh.agent_python("gw-rl", SCRIPT, timeout=120)
    # (each mode runs its own gateway, so each starts with full buckets)
    paths = seen["paths"]
    assert [r["status"] for r in paths] == [200, 200, 200, 429, 429, 429, 429, 429]
    limited = paths[3]
    assert limited["body"]["error"] == "rate_limited"
    assert limited["headers"]["retry-after"] == "60"
    assert limited["headers"]["x-ratelimit-limit"] == "3"
    assert limited["headers"]["x-ratelimit-remaining"] == "0"
    assert int(limited["headers"]["x-ratelimit-reset"]) <= 60
    assert [r["headers"]["x-ratelimit-remaining"] for r in paths[:3]] == ["2", "1", "0"]

    mcp = [r["status"] for r in seen["mcp"]]
    assert mcp == [200, 200, 200, 429, 429, 429, 429, 429], seen["mcp"]

    limited_records = mesh.audit(
        "--agent", "gw-rl", "--decision", "rate_limited", "--limit", "100", min_count=10
    )
    assert len(limited_records) == 10
    assert {r["destination"] for r in limited_records} == {"quota", "mcp"}

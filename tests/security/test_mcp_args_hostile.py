"""A hostile agent tries to get a tool call past its argument rules with JSON tricks.

`sec-mcp` may call read_file with a `path` starting with /workspace/, and set_level with a
`level` of at most 3. Each attack below is one `tools/call` whose arguments some JSON reader
could take as /etc/passwd (or a level above 3) while another reads them as allowed: a key sent
twice (as written, escaped, in another case, NFKC-equal), a wrong type, numbers beyond what
every reader agrees on, a batch, an escaped tool name, routing headers that disagree with the
body. The gateway (Envoy's routes, then the pacer's strict reading) must refuse every one with
a reason the model can read; the MCP server never sees a forbidden value, and the audit log
records each refusal without the value.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from gateway_agent import AGENT_LIB

if TYPE_CHECKING:  # the fixture comes from tests/security/conftest.py
    from hostile_mesh import Mesh

pytestmark = pytest.mark.e2e

SCRIPT = (
    AGENT_LIB
    + r"""
URL = "http://mcp.internal/mcp"
MCP = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def call(tool, arguments_text):
    return ('{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"%s","arguments":%s}}'
            % (tool, arguments_text))


OK_READ = call("read_file", '{"path":"/workspace/a"}')
ATTACKS = {
    "outside the prefix": (call("read_file", '{"path":"/etc/passwd"}'), {}),
    "duplicate key": (call("read_file", '{"path":"/workspace/a","path":"/etc/passwd"}'), {}),
    "duplicate, escaped": (
        call("read_file", '{"path":"/workspace/a","pa\\u0074h":"/etc/passwd"}'), {}),
    "duplicate, other case": (
        call("read_file", '{"path":"/workspace/a","Path":"/etc/passwd"}'), {}),
    "duplicate, NFKC": (
        call("read_file", '{"path":"/workspace/a","\\uff50ath":"/etc/passwd"}'), {}),
    "unknown argument": (call("read_file", '{"path":"/workspace/a","root":"/etc"}'), {}),
    "missing argument": (call("read_file", '{}'), {}),
    "arguments as a list": (call("read_file", '["/etc/passwd"]'), {}),
    "path as a list": (call("read_file", '{"path":["/workspace/a","/etc/passwd"]}'), {}),
    "path as an object": (call("read_file", '{"path":{"toString":"/etc/passwd"}}'), {}),
    "lone surrogate": (call("read_file", '{"path":"/workspace/\\ud800/../../etc/passwd"}'), {}),
    "huge level": (call("set_level", '{"level":1e400}'), {}),
    "negative huge level": (call("set_level", '{"level":-1e400}'), {}),
    "beyond 2^53": (call("set_level", '{"level":9007199254740993}'), {}),
    "level as a boolean": (call("set_level", '{"level":true}'), {}),
    "level as a string": (call("set_level", '{"level":"9"}'), {}),
    "NaN": (call("set_level", '{"level":NaN}'), {}),
    "level too high": (call("set_level", '{"level":4}'), {}),
    "escaped tool name": (call("read\\u005ffile", '{"path":"/etc/passwd"}'), {}),
    "batch": ("[" + OK_READ + "," + call("read_file", '{"path":"/etc/passwd"}') + "]", {}),
    "trailing second message": (OK_READ + call("read_file", '{"path":"/etc/passwd"}'), {}),
    "duplicate params": (
        OK_READ[:-1] + ',"params":{"name":"read_file","arguments":{"path":"/etc/passwd"}}}', {}),
    "Mcp-Name disagrees": (
        call("set_level", '{"level":9}'),
        {"Mcp-Method": "tools/call", "Mcp-Name": "read_file",
         "Mcp-Protocol-Version": "2026-07-28"}),
    "Mcp-Name twice": (call("read_file", '{"path":"/etc/passwd"}'), {"Mcp-Name": "read_file"}),
    "UTF-16 body": (call("read_file", '{"path":"/etc/passwd"}').encode("utf-16"), {}),
}
HONEST = {
    "read_file": (OK_READ, {}),
    "set_level": (call("set_level", '{"level":3}'), {}),
    "2026 headers": (call("set_level", '{"level":2.5}'),
                     {"Mcp-Method": "tools/call", "Mcp-Name": "set_level",
                      "Mcp-Protocol-Version": "2026-07-28"}),
}
out = {}
for group in (ATTACKS, HONEST):
    for name, (body, headers) in group.items():
        headers = {**MCP, **headers, "x-test-case": name}
        if name == "Mcp-Name twice":  # http.client sends a list value as repeated lines
            conn = http.client.HTTPConnection(_PROXY.hostname, _PROXY.port, timeout=30)
            conn.putrequest("POST", URL)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.putheader("Mcp-Name", "write_file")
            data = body.encode()
            conn.putheader("Content-Length", str(len(data)))
            conn.endheaders(data)
            resp = conn.getresponse()
            raw = resp.read()
            r = {"status": resp.status, "body": json.loads(raw) if raw else ""}
        else:
            r = send("POST", URL, body, headers)
        out[name] = {"status": r["status"], "body": r["body"]}
print(json.dumps(out))
"""
)


def refusal(r: dict[str, Any]) -> bool:
    """Refused, with a reason the agent can read (as tests/security/test_gateway_mcp.py)."""
    body = r["body"]
    if not isinstance(body, dict):
        return False
    if r["status"] == 403:
        return body.get("error") in ("mcp_unparsed", "tool_denied") and bool(body.get("reason"))
    if r["status"] == 400 and body.get("jsonrpc") == "2.0":
        return "refused by meshgate" in body["error"]["message"]
    if r["status"] == 200 and body.get("jsonrpc") == "2.0":
        result = body.get("result", {})
        return result.get("isError") is True and "refused by meshgate" in json.dumps(result)
    return False


def test_argument_rules_hold_against_json_tricks(mesh: Mesh) -> None:
    mcp = mesh.upstreams["mcp"]
    mcp.clear()
    seen: dict[str, Any] = mesh.agent_python("sec-mcp", SCRIPT, timeout=120)
    honest = {"read_file", "set_level", "2026 headers"}
    attacks = {k: v for k, v in seen.items() if k not in honest}
    assert len(attacks) == 25
    for name, r in attacks.items():
        assert refusal(r), (name, r)
        assert "/etc/passwd" not in json.dumps(r["body"]), (name, r)  # values never echoed
    for name in honest:
        assert seen[name]["status"] == 200 and seen[name]["body"]["upstream"] == "mcp", seen[name]
    reached = {h["headers"].get("x-test-case") for h in mcp.hits}
    assert reached == honest, sorted(reached - honest)
    assert not [h for h in mcp.hits if "passwd" in h["body"]]
    denied = mesh.audit(
        "--agent", "sec-mcp", "--decision", "denied", "--limit", "100", min_count=len(attacks)
    )
    assert len(denied) == len(attacks), [r["reason"] for r in denied]
    assert "passwd" not in json.dumps(denied)

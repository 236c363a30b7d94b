"""A hostile agent sends headers meant to fool the upstream or the audit trail.

- `x-meshgate-identity` is the tool-JWT header only the gateway sets: the agent's copy never
  reaches an upstream.
- `X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override` would make an upstream act on
  another method than the one the rule allowed: the gateway strips them.
- `x-envoy-original-path` once decided which path the audit record showed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from gateway_agent import AGENT_LIB

if TYPE_CHECKING:  # the fixture comes from tests/security/conftest.py; a plain import of
    from conftest import Mesh  # "conftest" can name another directory's conftest in a mixed run

pytestmark = pytest.mark.e2e

FORGED = {
    "x-meshgate-identity": "forged.jwt.token",
    "X-HTTP-Method-Override": "DELETE",
    "X-HTTP-Method": "DELETE",
    "X-Method-Override": "DELETE",
    "x-envoy-original-path": "/v1/docs/innocent",
}
SCRIPT = (
    AGENT_LIB
    + f"""
r = send("GET", "http://docs.internal/v1/search", headers={FORGED!r})
print(json.dumps({{"status": r["status"], "request_id": r["headers"].get("x-request-id")}}))
"""
)


def test_forged_headers_never_reach_upstreams_or_the_audit(mesh: Mesh) -> None:
    docs = mesh.upstreams["docs"]
    docs.clear()
    seen: dict[str, Any] = mesh.agent_python("researcher", SCRIPT)
    assert seen["status"] == 200
    [hit] = docs.hits
    sent = {k.lower() for k in FORGED} - {"x-envoy-original-path"}
    assert not sent & set(hit["headers"]), hit["headers"]
    assert hit["method"] == "GET"

    [record] = [
        r
        for r in mesh.audit("--agent", "researcher", "--since", "5m", "--limit", "1000")
        if r["request_id"] == seen["request_id"]
    ] or [None]
    assert record is not None, "the request has a record"
    assert record["path"] == "/v1/search"  # what was decided and forwarded, not the header

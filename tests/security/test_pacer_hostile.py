"""A hostile agent tries to spend past its request budget.

`sec-spender` may make 3 requests a day (its AgentPolicy budget) to docs.internal/v1/docs/*.
Once they are spent, no variant of the request may reach the upstream: another path spelling,
HEAD instead of GET, a reused or forged `x-request-id` (an admission is the pacer's, never
replayed for an id the agent chose), headers naming another agent or the pacer's answer.

`sec-tunneler` may make 2 requests a day and open tunnels to vault.test (`tls: passthrough`).
docs/policy.md: an AgentPolicy's budget is "the agent's counter over all its requests", and
"request budgets count every request"; a CONNECT is one (it is audited as one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from gateway_agent import AGENT_LIB

if TYPE_CHECKING:  # the fixture comes from tests/security/conftest.py
    from hostile_mesh import Mesh

pytestmark = pytest.mark.e2e

SPEND = (
    AGENT_LIB
    + r"""
URL = "http://docs.internal"
out = {"honest": [], "after": {}}
for i in range(3):
    r = send("GET", URL + f"/v1/docs/page{i}", headers={"x-request-id": "same-id"})
    out["honest"].append(r["status"])
VARIANTS = {
    "plain": ("GET", "/v1/docs/page9", {}),
    "same request id": ("GET", "/v1/docs/page0", {"x-request-id": "same-id"}),
    "dot segments": ("GET", "/v1/docs/x/../page9", {}),
    "double slash": ("GET", "//v1/docs//page9", {}),
    "encoded dot": ("GET", "/v1/docs/%2e/page9", {}),
    "query": ("GET", "/v1/docs/page9?budget=0", {}),
    "HEAD": ("HEAD", "/v1/docs/page9", {}),
    "another agent": ("GET", "/v1/docs/page9", {"x-meshgate-agent": "researcher"}),
    "pacer verdict": ("GET", "/v1/docs/page9", {"x-meshgate-limit": "ok"}),
}
for name, (method, path, headers) in VARIANTS.items():
    r = send(method, URL + path, headers={**headers, "x-test-case": name})
    error = r["body"].get("error") if isinstance(r["body"], dict) else r["body"]
    if isinstance(error, dict):  # the pacer's refusals read like the providers' errors
        error = error.get("type")
    out["after"][name] = [r["status"], error]
print(json.dumps(out))
"""
)

TUNNELS = r"""
import json, os, socket, urllib.parse
proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
out = []
for i in range(4):
    s = socket.create_connection((proxy.hostname, proxy.port), timeout=10)
    s.sendall(b"CONNECT vault.test:443 HTTP/1.1\r\nHost: vault.test:443\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    s.close()
    out.append(int(head.split(b" ")[1]) if head else 0)
print(json.dumps(out))
"""


def test_a_spent_request_budget_admits_no_variant(mesh: Mesh) -> None:
    docs = mesh.upstreams["docs"]
    seen: dict[str, Any] = mesh.agent_python("sec-spender", SPEND, timeout=120)
    assert seen["honest"] == [200, 200, 200]
    for name, (status, error) in seen["after"].items():
        # refused: over budget (429), or by the gateway's path guard before any budget (400)
        assert status in (400, 429), (name, status, error)
        if name != "HEAD":  # a HEAD answer has no body to say why
            assert error in ("over_budget", "path_not_canonical"), (name, error)
    spender = [h for h in docs.hits if h["path"].startswith("/v1/docs/page")]
    assert len([h for h in spender if h["headers"].get("x-test-case")]) == 0
    over = mesh.audit("--agent", "sec-spender", "--decision", "over_budget", min_count=5)
    assert len(over) >= 5 and all("agent/sec-spender/daily" in r["reason"] for r in over), over


def test_passthrough_tunnels_count_in_the_agents_request_budget(mesh: Mesh) -> None:
    statuses = mesh.agent_python("sec-tunneler", TUNNELS, timeout=120)
    # two tunnels fit the budget of 2 requests a day; the next ones are refused
    assert statuses == [200, 200, 429, 429], statuses

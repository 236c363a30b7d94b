"""Per-agent allowlists and rate limits enforced by a real Envoy gateway, with real traffic."""

from __future__ import annotations

from pathlib import Path

import pytest
from builders import free_port
from harness import MESH, control_plane, gateway, upstream, via_gateway

pytestmark = pytest.mark.e2e

POLICY = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: search}}
spec:
  host: search.internal
  port: 80
  tls: none
  address: 127.0.0.1:{search}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: llm}}
spec:
  host: llm.internal
  port: 80
  tls: none
  address: 127.0.0.1:{llm}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: researcher}}
spec:
  agent: researcher
  egress:
    - destination: search
      methods: [GET]
      paths: ["/v1/search", "/v1/docs/*"]
    - destination: llm
      methods: [POST]
      paths: ["/v1/chat"]
      rateLimit: {{requests: 3, per: 1m}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: coder}}
spec:
  agent: coder
  egress:
    - destination: llm
"""


async def test_allowlist_by_host_method_path_and_agent_and_rate_limit(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("search") as search, upstream("llm") as llm:
        policy = tmp_path / "policies"
        policy.mkdir()
        (policy / "mesh.yaml").write_text(MESH.format(port=listen))
        (policy / "rules.yaml").write_text(POLICY.format(search=search.port, llm=llm.port))
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path):
            ok = await via_gateway(listen, "search.internal", "/v1/search?q=envoy")
            assert ok.status_code == 200 and ok.json()["upstream"] == "search"
            assert (await via_gateway(listen, "search.internal", "/v1/docs/a/b")).status_code == 200

            wrong_path = await via_gateway(listen, "search.internal", "/v1/admin")
            assert wrong_path.status_code == 403
            assert wrong_path.json() == {
                "error": "egress_denied",
                "agent": "researcher",
                "destination": "search",
                "reason": "no rule of this agent allows this method and path",
            }
            wrong_method = await via_gateway(listen, "search.internal", "/v1/search", "DELETE")
            assert wrong_method.status_code == 403
            # exact path means exact: no prefix match
            assert (await via_gateway(listen, "search.internal", "/v1/search/x")).status_code == 403

            # coder has no rule for search; anyone without an identity is refused
            coder = await via_gateway(listen, "search.internal", "/v1/search", agent="coder")
            assert coder.status_code == 403 and coder.json()["agent"] == "coder"
            anonymous = await via_gateway(listen, "search.internal", "/v1/search", agent=None)
            assert anonymous.status_code == 403
            # coder may use any method and path on llm, without a limit
            for _ in range(5):
                r = await via_gateway(listen, "llm.internal", "/anything", "PUT", agent="coder")
                assert r.status_code == 200

            # researcher: 3 per minute on llm, then 429 with retry-after and a JSON body
            codes = []
            for _ in range(5):
                r = await via_gateway(listen, "llm.internal", "/v1/chat", "POST", json={})
                codes.append(r.status_code)
            assert codes == [200, 200, 200, 429, 429]
            assert r.headers["retry-after"] == "60"
            assert r.json()["error"] == "rate_limited"
            assert r.json()["agent"] == "researcher"
            # the limit is per agent: coder is unaffected
            assert (
                await via_gateway(listen, "llm.internal", "/v1/chat", "POST", agent="coder")
            ).status_code == 200
            assert len(search.hits) == 2

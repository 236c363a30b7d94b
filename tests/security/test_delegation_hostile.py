"""Delegation from a hostile agent (an unprivileged user under `meshgate sidecar run`).

An agent whose policy has no `delegation` has no route to the delegation endpoint; calling the
endpoint directly on loopback, with any identity header it likes, is refused (only a gateway
holds the key it must carry); and the key is not readable by the agent.
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
import sys, urllib.request
endpoint, key_file = sys.argv[1], sys.argv[2]
ask = json.dumps({"name": "mine", "ttl": "1m", "rules": [{"rule": 0}]})
out = {"via_sidecar": send("POST", "http://meshgate.internal/v1/sub-agents", body=ask,
                           headers={"content-type": "application/json"})}
forged = {"x-meshgate-agent": "spiffe://agents.test/agent/researcher",
          "x-meshgate-delegation-key": "guess", "content-type": "application/json"}
req = urllib.request.Request(f"http://{endpoint}/v1/sub-agents", data=ask.encode(),
                             headers=forged, method="POST")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight, no sidecar
try:
    r = opener.open(req, timeout=10)
    out["direct"] = {"status": r.status, "body": json.loads(r.read())}
except urllib.error.HTTPError as e:
    out["direct"] = {"status": e.code, "body": json.loads(e.read())}
try:
    open(key_file).read()
    out["key"] = "READ"
except OSError as e:
    out["key"] = e.strerror
print(json.dumps(out))
"""
)


def test_an_agent_cannot_reach_or_fake_the_delegation_endpoint(mesh: Mesh) -> None:
    status = mesh.meshgate("status", "--format", "json", "--admin", mesh.admin_url)
    assert status.returncode == 0, status.stderr
    endpoint = json.loads(status.stdout)["control_plane"]["delegation"]
    assert endpoint, "delegation is on with mTLS"
    key_file = str(mesh.state_dir / "delegation" / "gateway-key")
    seen: dict[str, Any] = mesh.agent_python("researcher", SCRIPT, args=(endpoint, key_file))
    assert seen["via_sidecar"]["status"] == 403, seen
    assert seen["via_sidecar"]["body"]["error"] == "egress_denied"
    assert seen["direct"] == {
        "status": 403,
        "body": {"error": "not_through_gateway", "reason": "call this through your sidecar"},
    }
    assert seen["key"] != "READ"

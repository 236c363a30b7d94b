"""TLS origination: the agent speaks plain HTTP, the gateway opens verified TLS upstream."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from builders import free_port, write_test_pki
from harness import MESH, control_plane, gateway, upstream, via_gateway

pytestmark = pytest.mark.e2e

DEST = """\
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: {name}}}
spec:
  host: {host}
  port: 443
  tls: originate
  address: 127.0.0.1:{port}
  caFile: {ca}
"""

AGENT = """\
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: researcher}
spec:
  agent: researcher
  egress:
    - destination: good
    - destination: impostor
"""


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_originate_verifies_upstream_and_fails_closed(tmp_path: Path) -> None:
    trusted_ca, good_cert, good_key = write_test_pki(tmp_path / "pki", ["secure.tools"], "good")
    # same host name, but signed by a CA the policy does not trust
    _, bad_cert, bad_key = write_test_pki(tmp_path / "pki", ["secure2.tools"], "rogue")
    listen = free_port()
    async with (
        upstream("good", server_tls(good_cert, good_key)) as good,
        upstream("impostor", server_tls(bad_cert, bad_key)) as bad,
    ):
        policy = tmp_path / "policies"
        policy.mkdir()
        (policy / "mesh.yaml").write_text(MESH.format(port=listen))
        (policy / "rules.yaml").write_text(
            DEST.format(name="good", host="secure.tools", port=good.port, ca=trusted_ca)
            + DEST.format(name="impostor", host="secure2.tools", port=bad.port, ca=trusted_ca)
            + AGENT
        )
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path):
            ok = await via_gateway(listen, "secure.tools", "/v1/x")
            assert ok.status_code == 200
            assert ok.json() == {"upstream": "good", "path": "/v1/x"}
            refused = await via_gateway(listen, "secure2.tools", "/v1/x")
            assert refused.status_code == 503
            assert refused.json()["error"] == "upstream_error"
            assert "TLS_error" in refused.json()["reason"] or "CERTIFICATE" in refused.text.upper()
            assert not bad.hits

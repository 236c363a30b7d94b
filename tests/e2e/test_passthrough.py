"""tls: passthrough: the agent's CONNECT through its sidecar is allowed or refused by host."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import httpx
import pytest
from builders import free_port, write_test_pki
from harness import MESH, control_plane, gateway, sidecar, upstream

pytestmark = pytest.mark.e2e

POLICY = """\
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: vault}}
spec:
  host: vault.tools
  port: {port}
  tls: passthrough
  address: 127.0.0.1:{port}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: plain}}
spec:
  host: plain.internal
  port: 80
  tls: none
  address: 127.0.0.1:{port}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: researcher}}
spec:
  agent: researcher
  egress:
    - destination: vault
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: coder}}
spec:
  agent: coder
  egress:
    - destination: plain
"""


async def raw_connect(proxy: str, authority: str) -> tuple[str, str]:
    """Send a bare CONNECT and return the response head and body, as curl -v would show."""
    host, port = proxy.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return head, body


async def test_connect_tunnel_allowed_by_host_and_refusals_say_why(tmp_path: Path) -> None:
    ca, cert, key = write_test_pki(tmp_path / "pki", ["vault.tools"], "vault")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    listen = free_port()
    async with upstream("vault", server) as up:
        policy = tmp_path / "policies"
        policy.mkdir()
        (policy / "mesh.yaml").write_text(MESH.format(port=listen))
        (policy / "rules.yaml").write_text(POLICY.format(port=up.port))
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path):
            async with sidecar(cp, tmp_path, "researcher") as proxy:
                trust = ssl.create_default_context(cafile=str(ca))
                async with httpx.AsyncClient(proxy=proxy, verify=trust, timeout=10) as client:
                    r = await client.get(f"https://vault.tools:{up.port}/v1/secret")
                    assert r.status_code == 200
                    assert r.json() == {"upstream": "vault", "path": "/v1/secret"}
                    # end-to-end TLS: the upstream, not the gateway, presented the certificate
                    with pytest.raises(httpx.ProxyError) as refused:
                        await client.get("https://elsewhere.example/")
                    assert "403" in str(refused.value)
            async with sidecar(cp, tmp_path, "coder") as proxy:
                head, body = await raw_connect(proxy, f"vault.tools:{up.port}")
                assert head.startswith("HTTP/1.1 403")
                assert json.loads(body) == {
                    "error": "egress_denied",
                    "agent": "coder",
                    "destination": "vault",
                    "reason": "no rule of this agent allows a tunnel to this host",
                }
                # CONNECT to a tls: none destination says what to do instead
                head, body = await raw_connect(proxy, "plain.internal:80")
                assert head.startswith("HTTP/1.1 403")
                assert "send plain HTTP through the proxy" in json.loads(body)["reason"]
            assert len(up.hits) == 1

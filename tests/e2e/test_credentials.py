"""Credential injection: the gateway adds the key from SDS; agents never see it; rotation works."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from builders import admin_auth, free_port
from harness import MESH, control_plane, envoy_admin, gateway, until, upstream, via_gateway

pytestmark = pytest.mark.e2e

POLICY = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: llm}}
spec:
  host: llm.internal
  port: 80
  tls: none
  address: 127.0.0.1:{port}
  credentials: {{header: Authorization, secret: llm-key, format: "Bearer {{secret}}"}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: other}}
spec:
  host: other.internal
  port: 80
  tls: none
  address: 127.0.0.1:{port}
  credentials: {{header: X-Api-Key, secret: not-there}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: researcher}}
spec:
  agent: researcher
  egress:
    - destination: llm
    - destination: other
"""

KEY1 = "sk-test-FIRST-0123456789abcdef"
KEY2 = "sk-test-SECOND-fedcba9876543210"


async def test_injected_rotated_never_exposed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    listen = free_port()
    async with upstream("llm") as up:
        policy = tmp_path / "policies"
        (policy / "secrets").mkdir(parents=True)
        (policy / "mesh.yaml").write_text(
            MESH.format(port=listen) + "  secrets: {provider: file, path: ./secrets}\n"
        )
        (policy / "rules.yaml").write_text(POLICY.format(port=up.port))
        (policy / "secrets" / "llm-key").write_text(KEY1 + "\n")
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path) as gw:
            # the agent's own Authorization header is replaced, never forwarded
            r = await via_gateway(
                listen, "llm.internal", "/v1/chat", headers={"Authorization": "Bearer agent-own"}
            )
            assert r.status_code == 200
            assert up.hits[-1]["headers"]["Authorization"] == f"Bearer {KEY1}"
            assert KEY1 not in r.text and KEY1 not in str(r.headers)
            # Envoy picks virtual hosts case-insensitively: so does the injector's matcher
            for host in ("LLM.internal", "llm.INTERNAL:80"):
                r = await via_gateway(
                    listen, host, "/v1/chat", headers={"Authorization": "Bearer agent-own"}
                )
                assert r.status_code == 200, host
                assert up.hits[-1]["headers"]["Authorization"] == f"Bearer {KEY1}", host

            # a missing secret fails closed with a reason, and status names it (not a value)
            missing = await via_gateway(listen, "other.internal", "/")
            assert missing.status_code == 503
            assert missing.json()["error"] == "credential_unavailable"
            async with httpx.AsyncClient(headers=admin_auth(cp)) as client:
                status = (await client.get(f"http://{cp.admin_address}/status")).text
            assert '"missing_secrets": ["not-there"]' in status.replace("\n", "")

            # rotation: new value on the next requests, no restart
            pid = gw.proc.pid if gw.proc else None
            (policy / "secrets" / "llm-key").write_text(KEY2)

            async def rotated() -> bool:
                await via_gateway(listen, "llm.internal", "/v1/chat")
                return bool(up.hits[-1]["headers"]["Authorization"] == f"Bearer {KEY2}")

            await until(rotated, timeout=10, what="rotated key to be used")
            assert gw.proc is not None and gw.proc.pid == pid

            # never in status, the served policy, logs, or Envoy's config dump
            async with httpx.AsyncClient(headers=admin_auth(cp)) as client:
                exposed = [
                    (await client.get(f"http://{cp.admin_address}{path}")).text
                    for path in ("/status", "/v1/policy", "/metrics")
                ]
            exposed.append(caplog.text)
            exposed.append(await envoy_admin(gw, "/config_dump?include_eds"))
            assert '"nodes"' in exposed[0]  # answered, not refused
            for text in exposed:
                assert KEY1 not in text and KEY2 not in text
                assert str(cp.admin_token) not in text  # nor the admin token


WILDCARD = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: tenants}}
spec:
  host: "*.tenants.internal"
  port: 80
  tls: none
  address: 127.0.0.1:{port}
  credentials: {{header: X-Api-Key, secret: tenants-key}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: audit-tenant}}
spec:
  host: audit.tenants.internal
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
    - destination: tenants
    - destination: audit-tenant
"""


def api_key(hit: dict[str, Any]) -> str | None:
    return next((v for k, v in hit["headers"].items() if k.lower() == "x-api-key"), None)


async def test_a_wildcard_destination_gets_its_key_and_a_name_under_it_does_not(
    tmp_path: Path,
) -> None:
    listen = free_port()
    async with upstream("tenants") as up:
        policy = tmp_path / "policies"
        (policy / "secrets").mkdir(parents=True)
        (policy / "mesh.yaml").write_text(
            MESH.format(port=listen) + "  secrets: {provider: file, path: ./secrets}\n"
        )
        (policy / "rules.yaml").write_text(WILDCARD.format(port=up.port))
        (policy / "secrets" / "tenants-key").write_text(KEY1 + "\n")
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path):
            del cp
            for host in ("acme.tenants.internal", "Beta.Tenants.Internal:80"):
                r = await via_gateway(listen, host, "/v1/x", headers={"X-Api-Key": "agent-own"})
                assert r.status_code == 200, (host, r.text)
                assert api_key(up.hits[-1]) == KEY1, host
            # another destination, named exactly under the wildcard: never the wildcard's key
            for host in ("audit.tenants.internal", "AUDIT.tenants.internal:80"):
                r = await via_gateway(listen, host, "/v1/x", headers={"X-Api-Key": "agent-own"})
                assert r.status_code == 200, (host, r.text)
                assert api_key(up.hits[-1]) == "agent-own", host
            # two labels under the one-label wildcard: no destination, nothing sent
            hits = len(up.hits)
            r = await via_gateway(listen, "a.b.tenants.internal", "/v1/x")
            assert r.status_code == 403 and r.json()["error"] == "unknown_destination"
            assert len(up.hits) == hits

"""Tool JWTs: the gateway tells an internal tool which agent calls, in a token the tool can verify
against the control plane's JWKS without trusting the network."""

from __future__ import annotations

from pathlib import Path

import httpx
import jwt
import pytest
from builders import free_port
from harness import MESH, control_plane, gateway, sidecar, upstream

pytestmark = pytest.mark.e2e

POLICY = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: billing}}
spec:
  host: billing.internal
  port: 80
  tls: none
  address: 127.0.0.1:{port}
  identity: jwt
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: search}}
spec:
  host: search.internal
  port: 80
  tls: none
  address: 127.0.0.1:{port}
  identity: jwt
  credentials: {{header: Authorization, secret: search-key, format: "Bearer {{secret}}"}}
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
    - destination: billing
    - destination: search
    - destination: plain
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: coder}}
spec:
  agent: coder
  egress:
    - destination: billing
"""


async def test_gateway_attaches_verifiable_agent_jwt(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("tools") as up:
        policy = tmp_path / "policies"
        (policy / "secrets").mkdir(parents=True)
        (policy / "secrets" / "search-key").write_text("sk-search-123")
        (policy / "mesh.yaml").write_text(
            MESH.format(port=listen) + "  secrets: {provider: file, path: ./secrets}\n"
        )
        (policy / "all.yaml").write_text(POLICY.format(port=up.port))
        async with (
            control_plane(policy, tmp_path / "state", mtls=True) as cp,
            gateway(cp, tmp_path),
        ):
            async with httpx.AsyncClient() as direct:
                jwks = (await direct.get(f"http://{cp.admin_address}/.well-known/jwks.json")).json()
            keys = jwt.PyJWKSet.from_dict(jwks)

            def claims(token: str, audience: str) -> dict[str, object]:
                kid = jwt.get_unverified_header(token)["kid"]
                key = next(k for k in keys.keys if k.key_id == kid)
                return jwt.decode(
                    token, key.key, algorithms=["ES256"], audience=audience,
                    issuer="spiffe://agents.test",
                )  # fmt: skip

            async with (
                sidecar(cp, tmp_path, "researcher") as proxy,
                httpx.AsyncClient(proxy=proxy, timeout=10) as client,
            ):
                # an agent cannot bring a token of its own: the gateway overwrites the header
                forged = jwt.encode({"sub": "spiffe://agents.test/agent/admin"}, "k" * 32)
                r = await client.get(
                    "http://billing.internal/invoices",
                    headers={"Authorization": f"Bearer {forged}"},
                )
                assert r.status_code == 200, r.text
                auth = up.hits[-1]["headers"]["Authorization"]
                assert auth.startswith("Bearer ") and forged not in auth
                got = claims(auth.removeprefix("Bearer "), "billing")
                assert got["sub"] == "spiffe://agents.test/agent/researcher"
                assert got["aud"] == "billing"
                assert int(got["exp"]) - int(got["iat"]) <= 600  # type: ignore[call-overload]

                # the destination's credential keeps Authorization; the JWT moves aside
                r = await client.get("http://search.internal/q")
                assert r.status_code == 200, r.text
                headers = {k.lower(): v for k, v in up.hits[-1]["headers"].items()}
                assert headers["authorization"] == "Bearer sk-search-123"
                got = claims(headers["x-meshgate-identity"], "search")
                assert got["sub"] == "spiffe://agents.test/agent/researcher"

                # a destination without `identity: jwt` gets nothing
                r = await client.get("http://plain.internal/")
                assert r.status_code == 200
                seen = {k.lower() for k in up.hits[-1]["headers"]}
                assert "authorization" not in seen and "x-meshgate-identity" not in seen

                # a token for one tool is no good at another
                with pytest.raises(jwt.InvalidAudienceError):
                    claims(auth.removeprefix("Bearer "), "search")

            async with (
                sidecar(cp, tmp_path, "coder") as proxy,
                httpx.AsyncClient(proxy=proxy, timeout=10) as client,
            ):
                r = await client.get("http://billing.internal/invoices")
                assert r.status_code == 200, r.text
                auth = up.hits[-1]["headers"]["Authorization"]
                assert claims(auth.removeprefix("Bearer "), "billing")["sub"] == (
                    "spiffe://agents.test/agent/coder"
                )


async def test_no_tool_jwt_without_mtls(tmp_path: Path) -> None:
    """Without mTLS the gateway only has the agent's word for who it is: nothing is signed."""
    listen = free_port()
    async with upstream("tools") as up:
        policy = tmp_path / "policies"
        (policy / "secrets").mkdir(parents=True)
        (policy / "secrets" / "search-key").write_text("sk-search-123")
        (policy / "mesh.yaml").write_text(
            MESH.format(port=listen) + "  secrets: {provider: file, path: ./secrets}\n"
        )
        (policy / "all.yaml").write_text(POLICY.format(port=up.port))
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path):
            async with httpx.AsyncClient() as direct:
                r = await direct.get(f"http://{cp.admin_address}/.well-known/jwks.json")
            assert r.status_code == 404 and "mTLS" in r.json()["error"]
            async with (
                sidecar(cp, tmp_path, "researcher") as proxy,
                httpx.AsyncClient(proxy=proxy, timeout=10) as client,
            ):
                r = await client.get("http://billing.internal/invoices")
                assert r.status_code == 200, r.text
                assert "Authorization" not in up.hits[-1]["headers"]

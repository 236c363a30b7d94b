"""Real Envoy gateways against the control plane: config arrives, changes propagate, NACKs hold."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from builders import admin_auth, free_port
from harness import (
    DESTINATION,
    control_plane,
    envoy_admin,
    gateway,
    until,
    upstream,
    via_gateway,
    write_policy,
)

from meshgate.errors import EnvoyError
from meshgate.xds import types

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_config_arrives_and_changes_propagate_without_restart(
    tmp_path: Path, delta: bool
) -> None:
    listen = free_port()
    async with upstream("alpha") as up_a, upstream("beta") as up_b:
        policy = tmp_path / "policies"
        write_policy(policy, listen, {"alpha": up_a.port})
        async with (
            control_plane(policy, tmp_path / "state") as cp,
            gateway(cp, tmp_path, delta=delta) as envoy,
        ):
            dump = json.loads(await envoy_admin(envoy, "/config_dump"))
            assert "egress-http" in json.dumps(dump)
            assert "dest-alpha" in await envoy_admin(envoy, "/clusters")
            assert "egress-http" in await envoy_admin(envoy, "/listeners")

            resp = await via_gateway(listen, "alpha.internal", "/hello")
            assert resp.status_code == 200
            assert resp.json() == {"upstream": "alpha", "path": "/hello"}
            refused = await via_gateway(listen, "beta.internal")
            assert refused.status_code == 403
            assert refused.json() == {"error": "unknown_destination", "host": "beta.internal"}

            pid = envoy.proc.pid if envoy.proc else None
            write_policy(policy, listen, {"alpha": up_a.port, "beta": up_b.port})

            async def beta_routes() -> bool:
                return (await via_gateway(listen, "beta.internal")).status_code == 200

            await until(beta_routes, timeout=5, what="new destination to route")
            assert envoy.proc is not None and envoy.proc.pid == pid
            assert envoy.proc.returncode is None
            assert up_b.hits
            [node] = [n for n in cp.registry.connections() if n.node_id == "gateway/e2e"]
            assert node.protocol == ("delta" if delta else "sotw")
            version = cp.policy.model.version if cp.policy.model else ""
            # clusters and routes changed, so both were re-sent and ACKed at the new version
            # (on delta an unchanged type, here the listener, is rightly not re-sent)
            for short in (types.CLUSTER, types.ROUTE):
                await until(
                    lambda t=short: node.policy_acked(t) == version,
                    what=f"{short} ACK",
                )


async def test_nacked_change_keeps_previous_config_and_is_reported(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("alpha") as up_a:
        policy = tmp_path / "policies"
        write_policy(policy, listen, {"alpha": up_a.port})
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path) as envoy:
            good_version = cp.policy.model.version if cp.policy.model else ""
            # Valid policy, but Envoy refuses it: the CA file does not exist on the gateway.
            bad = DESTINATION.format(name="broken", host="broken.internal", upstream=1).replace(
                "tls: none", "tls: originate\n  caFile: /nonexistent/ca.pem"
            )
            write_policy(policy, listen, {"alpha": up_a.port}, extra=bad)

            def nacked() -> bool:
                return any(n.last_nack for n in cp.registry.connections())

            await until(nacked, timeout=10, what="the gateway to NACK")
            [node] = cp.registry.connections()
            assert node.last_nack is not None
            assert "/nonexistent/ca.pem" in node.last_nack.message
            current = cp.cache.get("gateway")  # the NACKed version is the new content's
            assert current is not None
            assert node.last_nack.version == current.version(node.last_nack.type_url)
            assert cp.policy.model.version != good_version  # type: ignore[union-attr]
            # the previous config keeps serving
            resp = await via_gateway(listen, "alpha.internal")
            assert resp.status_code == 200
            assert "broken" not in await envoy_admin(envoy, "/clusters")
            # reported in status JSON
            async with httpx.AsyncClient(headers=admin_auth(cp)) as client:
                status = (await client.get(f"http://{cp.admin_address}/status")).json()
            assert "/nonexistent/ca.pem" in status["nodes"][0]["last_nack"]["message"]
            assert status["recent_nacks"]
            # not re-sent in a loop: one NACK for that version
            nacks_before = len(cp.registry.nacks())
            await asyncio.sleep(1.0)
            assert len(cp.registry.nacks()) == nacks_before
            # the next good version applies
            write_policy(policy, listen, {"alpha": up_a.port})

            def recovered() -> bool:
                st = node.types.values()
                return all(s.version_acked == s.version_sent and not s.in_flight for s in st)

            await until(recovered, timeout=10, what="the fixed policy to be ACKed")


async def test_invalid_policy_rejected_last_good_serves_fix_recovers(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("alpha") as up_a:
        policy = tmp_path / "policies"
        write_policy(policy, listen, {"alpha": up_a.port})
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path):
            good = cp.policy.model.version if cp.policy.model else None
            (policy / "agents.yaml").write_text(
                (policy / "agents.yaml")
                .read_text()
                .replace("destination: alpha", "destination: gh")
            )
            await until(lambda: cp.policy.rejection is not None, what="rejection")
            assert cp.policy.model is not None and cp.policy.model.version == good
            problems = cp.policy.rejection.problems  # type: ignore[union-attr]
            assert any("agents.yaml:" in p and 'unknown destination "gh"' in p for p in problems)
            assert (await via_gateway(listen, "alpha.internal")).status_code == 200
            write_policy(policy, listen, {"alpha": up_a.port, "alpha2": up_a.port})
            await until(lambda: cp.policy.rejection is None, what="recovery")
            assert cp.policy.model is not None and cp.policy.model.version != good

            async def routes() -> bool:
                return (await via_gateway(listen, "alpha2.internal")).status_code == 200

            await until(routes, timeout=5, what="fixed policy to serve")


async def test_policy_change_does_not_drop_in_flight_requests(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("alpha") as up_a, upstream("beta") as up_b:
        policy = tmp_path / "policies"
        write_policy(policy, listen, {"alpha": up_a.port})
        async with control_plane(policy, tmp_path / "state") as cp, gateway(cp, tmp_path):
            in_flight = asyncio.create_task(via_gateway(listen, "alpha.internal", "/slow?s=2"))
            await asyncio.sleep(0.3)  # let the request reach the upstream
            write_policy(policy, listen, {"alpha": up_a.port, "beta": up_b.port})

            async def beta_routes() -> bool:
                return (await via_gateway(listen, "beta.internal")).status_code == 200

            await until(beta_routes, timeout=5, what="the change to apply")
            assert not in_flight.done()  # the change applied while the request was in flight
            resp = await in_flight
            assert resp.status_code == 200
            assert resp.json()["path"] == "/slow?s=2"


async def test_authenticated_xds_real_envoy(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("alpha") as up_a:
        policy = tmp_path / "policies"
        write_policy(policy, listen, {"alpha": up_a.port})
        async with control_plane(policy, tmp_path / "state", require_tokens=True) as cp:
            async with gateway(cp, tmp_path, name="good"):
                assert (await via_gateway(listen, "alpha.internal")).status_code == 200
                [node] = cp.registry.connections()
                assert node.identity == "gateway/good"
            # a token for another node gets nothing: Envoy never becomes ready
            assert cp.tokens is not None
            wrong, _ = cp.tokens.create("gateway/other", 600)
            with pytest.raises(EnvoyError, match="not ready"):
                async with gateway(cp, tmp_path, name="bad", token=wrong, ready_timeout=3):
                    pass
            assert cp.registry.connections() == []

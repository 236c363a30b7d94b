"""Delegation with two control-plane replicas sharing one PostgreSQL registry, real Envoy
throughout: a supervisor creates a sub-agent through replica A (its sidecar and gateway are A's);
replica B then lists it, issues its certificate (ending with the delegation), and routes it
through B's own gateway; revoked through B, it is gone from A too.

The replicas share the CA (copied, as the Kubernetes Secret does) and the PostgreSQL schema; their
gateways listen on 127.0.0.1 and 127.0.0.2 with the policy's port.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from builders import free_port
from delegation_stores import pg_schema
from harness import control_plane, gateway, sidecar, until, upstream, write_policy

from meshgate.controlplane.server import ControlPlane, ServeOptions
from meshgate.controlplane.sources import DirectorySource

pytestmark = pytest.mark.e2e

AGENTS = """\
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: supervisor}
spec:
  agent: supervisor
  delegation: {maxSubAgents: 1, maxTtl: 10m}
  egress:
    - destination: alpha
"""
API = "http://meshgate.internal/v1/sub-agents"
SUB = "supervisor.web-1"


def served_subs(cp: ControlPlane) -> list[str]:
    served = cp.publisher.served_model()
    return [a.agent for a in served.agents if "." in a.agent] if served else []


async def test_a_sub_agent_created_on_one_replica_is_served_by_the_other(tmp_path: Path) -> None:
    listen = free_port()
    with pg_schema() as store:
        async with upstream("alpha") as up_a:
            policy = tmp_path / "policies"
            write_policy(policy, listen, {"alpha": up_a.port}, agents={})
            (policy / "agents.yaml").write_text(AGENTS)
            (tmp_path / "a").mkdir()
            (tmp_path / "b").mkdir()
            async with (
                control_plane(policy, tmp_path / "a/state", mtls=True, delegation_store=store) as a,
                gateway(a, tmp_path / "a", name="a"),
            ):
                shutil.copytree(tmp_path / "a/state/ca", tmp_path / "b/state/ca")  # shared CA
                async with (
                    second_replica(policy, tmp_path / "b/state", store, listen) as b,
                    gateway(b, tmp_path / "b", name="b"),
                ):
                    await replicas_agree(a, b, tmp_path, up_a.hits)


@asynccontextmanager
async def second_replica(
    policy: Path, state: Path, store: str, listen: int
) -> AsyncIterator[ControlPlane]:
    """Like `harness.control_plane`, but its gateways bind 127.0.0.2 (A's bind 127.0.0.1)."""
    opts = ServeOptions(
        "127.0.0.1",
        0,
        "127.0.0.1",
        0,
        "127.0.0.2",
        debounce_quiet=0.05,
        secrets_interval=0.2,
        mtls=True,
        gateway_address=("127.0.0.2", listen),
        delegation_store=store,
    )
    cp = ControlPlane(DirectorySource(policy, interval=0.1), state, opts)
    await cp.start()
    try:
        await until(lambda: cp.ready, timeout=10, what="replica B ready")
        yield cp
    finally:
        await cp.stop()


async def replicas_agree(
    a: ControlPlane, b: ControlPlane, tmp_path: Path, hits: list[dict[str, object]]
) -> None:
    assert a.delegation is not None and b.delegation is not None
    assert a.delegation.key == b.delegation.key  # what either replica's gateways inject
    async with (
        sidecar(a, tmp_path / "a", "supervisor") as via_a,
        sidecar(b, tmp_path / "b", "supervisor") as via_b,
        httpx.AsyncClient(proxy=via_a, timeout=10) as on_a,
        httpx.AsyncClient(proxy=via_b, timeout=10) as on_b,
    ):
        ask = {"name": "web-1", "ttl": "5m", "rules": [{"rule": 0, "paths": ["/public/*"]}]}
        r = await on_a.post(API, json=ask)
        assert r.status_code == 201, r.text
        expires = dt.datetime.fromisoformat(r.json()["expires_at"])
        # B learns of it from the store within about a second: listed, served, certified
        await until(lambda: served_subs(b) == [SUB], 10, "replica B serving the sub-agent")
        r = await on_b.get(API)
        assert r.status_code == 200, r.text
        assert [s["agent"] for s in r.json()["sub_agents"]] == [SUB]
        # maxSubAgents holds across replicas: B refuses a second one
        r = await on_b.post(API, json={**ask, "name": "web-2"})
        assert r.status_code == 403 and "maxSubAgents is 1" in r.json()["reason"], r.text
        assert b.issuer is not None
        cert = await until(
            lambda: b.issuer.issued("spiffe://agents.test/agent/supervisor/sub/web-1"),  # type: ignore[union-attr]
            10,
            "B's certificate for the sub-agent",
        )
        assert cert.not_after <= expires  # not the normal hour: its delegation's end

        # the sub-agent runs against B only: its sidecar and gateway are B's
        async with (
            sidecar(b, tmp_path / "b", SUB) as via_sub,
            httpx.AsyncClient(proxy=via_sub, timeout=10) as sub,
        ):
            ok = await sub.get("http://alpha.internal/public/page")
            assert ok.status_code == 200, ok.text
            outside = await sub.get("http://alpha.internal/private")
            assert outside.status_code == 403
            assert outside.json()["agent"] == "spiffe://agents.test/agent/supervisor/sub/web-1"
        assert [h["path"] for h in hits] == ["/public/page"]

        # revoked through B: A drops it too (routes and all), and lists nothing
        r = await on_b.delete(f"{API}/web-1")
        assert r.json() == {"deleted": [SUB]}, r.text
        await until(lambda: served_subs(a) == [], 10, "replica A dropping the sub-agent")
        r = await on_a.get(API)
        assert r.json()["sub_agents"] == []
        assert a.delegation.sub_agents() == []

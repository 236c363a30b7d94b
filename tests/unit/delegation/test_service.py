"""The delegation endpoint over HTTP: who asks comes from the gateway-forwarded identity, and
only with the key gateways hold; a caller sees and deletes only its own sub-agents."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from meshgate.delegation.expand import KEY_HEADER, Service, expand
from meshgate.delegation.registry import DelegationRegistry
from meshgate.delegation.service import AGENT_HEADER, DelegationServer
from meshgate.identity.tokens import TokenAuthority, TokenError
from meshgate.policy.model import (
    AgentPolicy,
    Delegation,
    Destination,
    EgressRule,
    Mesh,
    PolicyModel,
)

MODEL = PolicyModel(
    Mesh(trust_domain="agents.test"),
    (Destination("alpha", "alpha.internal", 80),),
    (
        AgentPolicy("a", "sup", (EgressRule("alpha"),), delegation=Delegation(2, 600)),
        AgentPolicy("b", "other", (EgressRule("alpha"),), delegation=Delegation(2, 600)),
    ),
    "v1",
)
ASK = {"name": "web-1", "ttl": "5m", "rules": [{"rule": 0, "methods": ["GET"]}]}


def as_agent(agent: str, key: str) -> dict[str, str]:
    return {AGENT_HEADER: f"spiffe://agents.test/agent/{agent}", KEY_HEADER: key}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[DelegationServer]:
    registry = DelegationRegistry(tmp_path, time.time)  # the clock tokens are signed by
    pokes: list[int] = []

    def served() -> PolicyModel:
        return expand(MODEL, registry.current(MODEL), Service(("127.0.0.1", 9))).model

    srv = DelegationServer(registry, served, TokenAuthority(tmp_path), lambda: pokes.append(1))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_create_list_delete(server: DelegationServer) -> None:
    key = server.registry.key
    base = f"http://127.0.0.1:{server.port}/v1/sub-agents"
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(base, json=ASK, headers=as_agent("sup", key))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["agent"] == "sup.web-1"
        assert server.tokens is not None
        claims = server.tokens.verify(body["join_token"])
        assert claims.subject == "agent/sup.web-1"
        # another agent neither sees nor deletes it
        r = await c.get(base, headers=as_agent("other", key))
        assert r.json() == {"agent": "other", "sub_agents": []}
        r = await c.delete(f"{base}/web-1", headers=as_agent("other", key))
        assert r.status_code == 404
        r = await c.get(base, headers=as_agent("sup", key))
        assert [s["agent"] for s in r.json()["sub_agents"]] == ["sup.web-1"]
        r = await c.delete(f"{base}/web-1", headers=as_agent("sup", key))
        assert r.json() == {"deleted": ["sup.web-1"]}
    with pytest.raises(TokenError, match="revoked"):
        server.tokens.verify(body["join_token"])


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({AGENT_HEADER: "spiffe://agents.test/agent/sup"}, "not_through_gateway"),
        (
            {AGENT_HEADER: "spiffe://agents.test/agent/sup", KEY_HEADER: "guess"},
            "not_through_gateway",
        ),
        ({AGENT_HEADER: "sup", KEY_HEADER: "KEY"}, "no_identity"),
        ({AGENT_HEADER: "spiffe://elsewhere.test/agent/sup", KEY_HEADER: "KEY"}, "no_identity"),
        ({AGENT_HEADER: "spiffe://agents.test/gateway/g", KEY_HEADER: "KEY"}, "no_identity"),
        ({KEY_HEADER: "KEY"}, "no_identity"),
    ],
)
async def test_refused_without_the_key_or_an_agent_identity(
    server: DelegationServer, headers: dict[str, str], error: str
) -> None:
    sent = {k: (server.registry.key if v == "KEY" else v) for k, v in headers.items()}
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(f"http://127.0.0.1:{server.port}/v1/sub-agents", json=ASK, headers=sent)
    assert r.status_code == 403 and r.json()["error"] == error
    assert server.registry.all() == []

"""The delegation endpoint over HTTP: who asks comes from the gateway-forwarded identity, and
only with the key gateways hold; a caller sees and deletes only its own sub-agents."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from meshgate.delegation.expand import KEY_HEADER, Service, expand
from meshgate.delegation.registry import STALE_LIMIT, DelegationRegistry, Request
from meshgate.delegation.rights import RuleGrant
from meshgate.delegation.service import AGENT_HEADER, DelegationServer
from meshgate.delegation.stores import DelegationStoreError, FileStore, SubAgentStore
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


async def test_the_join_token_ends_with_the_delegation(server: DelegationServer) -> None:
    import datetime as dt

    base = f"http://127.0.0.1:{server.port}/v1/sub-agents"
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(
            base, json={**ASK, "ttl": "90s"}, headers=as_agent("sup", server.registry.key)
        )
    assert r.status_code == 201, r.text
    assert server.tokens is not None
    claims = server.tokens.verify(r.json()["join_token"])
    ends = dt.datetime.fromisoformat(r.json()["expires_at"]).timestamp()
    assert ends - 90 <= claims.expires_at <= ends  # the delegation's 90 s, never the default


class DownStore:
    """A store whose database stopped answering after it opened."""

    def __init__(self, inner: SubAgentStore) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.inner, name)
        if name in ("gateway_key", "close") or not self.down:
            return attr

        def fail(*args: object) -> object:
            raise DelegationStoreError("db:5432: connection refused")

        return fail


async def test_a_store_that_does_not_answer_is_a_503_not_a_change(tmp_path: Path) -> None:
    store = DownStore(FileStore(tmp_path / "d"))
    registry = DelegationRegistry(store, time.time)  # type: ignore[arg-type]
    srv = DelegationServer(registry, lambda: MODEL, None, lambda: None)
    await srv.start()
    try:
        base = f"http://127.0.0.1:{srv.port}/v1/sub-agents"
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.post(base, json=ASK, headers=as_agent("sup", registry.key))
            assert r.status_code == 201
            store.down = True
            for method, url in (("POST", base), ("GET", base), ("DELETE", f"{base}/web-1")):
                r = await c.request(method, url, json=ASK, headers=as_agent("sup", registry.key))
                assert r.status_code == 503, (method, r.text)
                assert r.json() == {
                    "error": "store_unavailable",
                    "reason": "the delegation store did not answer",
                }
        store.down = False
        assert [s.name for s in store.load()] == ["sup.web-1"]
    finally:
        await srv.stop()


def test_an_unanswering_store_serves_the_last_list_briefly_then_none(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = DownStore(FileStore(tmp_path / "d"))
    registry = DelegationRegistry(store, lambda: now[0])  # type: ignore[arg-type]
    registry.create("sup", Request("web-1", 300, (RuleGrant(0),)), MODEL)
    assert [s.name for s in registry.current(MODEL)] == ["sup.web-1"]
    store.down = True
    now[0] += 10
    assert [s.name for s in registry.current(MODEL)] == ["sup.web-1"]  # a database restart
    now[0] += STALE_LIMIT
    assert registry.current(MODEL) == ()  # too long: fail closed
    store.down = False
    assert [s.name for s in registry.current(MODEL)] == ["sup.web-1"]  # never deleted

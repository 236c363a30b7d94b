"""Issue 19 end to end: two real gateway replicas (what `meshgate gateway` runs: Envoy plus its
pacer) sharing one real Redis, configured over xDS from policy, in front of the local LLM
stand-in. Budgets reserved before admission hold exactly under concurrency across replicas,
global limits are shared, and the official SDKs read the refusals.

Both replicas listen on the Mesh's one port (Envoy's listeners reuse the port, as replicas
behind one Service would), and clients open a new connection per request, so the kernel spreads
requests over both; each test checks that both replicas served some.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from builders import free_port
from harness import audit_records, control_plane, until
from pacing_redis import RedisProcess, redis_server

from meshgate.cli.gateway import start_gateway
from meshgate.controlplane.server import ControlPlane
from meshgate.demo.llm_provider import LlmProvider
from meshgate.pacing.redis_store import RedisStore
from meshgate.pacing.spec import window_bounds

pytestmark = pytest.mark.e2e
__all__ = ["redis_server"]

POLICY = """\
apiVersion: meshgate.dev/v1
kind: Mesh
metadata: {{name: default}}
spec:
  trustDomain: agents.test
  egressGateway: {{listenPort: {port}}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: docs}}
spec: {{host: docs.internal, port: 80, tls: none, address: "127.0.0.1:{llm}"}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: llm}}
spec:
  host: llm.internal
  port: 80
  tls: none
  address: "127.0.0.1:{llm}"
  llm: {{api: openai, prices: {{"gpt-4o-mini": {{input: "1", output: "2"}}}}}}
---
apiVersion: meshgate.dev/v1
kind: AgentGroup
metadata: {{name: team}}
spec:
  agents: [a1, a2, a3, a4]
  budgets: [{{name: calls, window: day, requests: 50}}]
  egress:
    - destination: docs
      rateLimit: {{requests: 20, per: 1h, scope: global}}
    - destination: llm
      maxTokens: 40
      budgets: [{{name: tokens, window: day, tokens: {tokens}}}]
"""
AGENTS = "".join(
    f"---\napiVersion: meshgate.dev/v1\nkind: AgentPolicy\nmetadata: {{name: {a}}}\n"
    f"spec: {{agent: {a}}}\n"
    for a in ("a1", "a2", "a3", "a4")
)
TOKENS = 400


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path, redis: RedisProcess) -> AsyncIterator[tuple[ControlPlane, int]]:
    provider = LlmProvider(reply_tokens=30, delay=0.05)
    llm_port = await provider.start()
    port = free_port()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(
        POLICY.format(port=port, llm=llm_port, tokens=TOKENS) + AGENTS
    )
    try:
        async with control_plane(policies, tmp_path / "cp") as cp:
            gateways = []
            try:
                for n in (1, 2):
                    gateways.append(
                        await start_gateway(
                            cp.xds_address,
                            "egress",
                            tmp_path / f"gw{n}",
                            False,
                            1,
                            wait_ready=True,
                            insecure=True,
                            limit_store=redis.url,
                        )
                    )
                await until(lambda: _listening(port), timeout=30, what="gateway listener")
                yield cp, port
                served = [await _served(gw) for gw in gateways]
                assert all(served), f"both replicas must serve requests: {served}"
            finally:
                for gw in gateways:
                    await gw.stop()
    finally:
        await provider.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def _served(gw: Any) -> int:
    stats = (await asyncio.to_thread(gw.admin.get, "/stats?filter=downstream_rq_total")).text
    return sum(int(line.rsplit(" ", 1)[1]) for line in stats.splitlines() if "egress" in line)


async def call(port: int, agent: str, host: str, path: str, **kw: Any) -> httpx.Response:
    """One request on a new connection (so requests spread over the replicas)."""
    headers = {"host": host, "x-meshgate-agent": agent, **kw.pop("headers", {})}
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:
        return await client.request(
            kw.pop("method", "GET"), f"http://127.0.0.1:{port}{path}", headers=headers, **kw
        )


async def test_a_group_budget_admits_exactly_its_limit_across_two_replicas(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    async with mesh(tmp_path, redis_server) as (_, port):
        agents = [f"a{1 + n % 4}" for n in range(200)]

        async def as_an_sdk_would(agent: str) -> httpx.Response:
            """Retry after a fail-closed 503 (a store call too slow on a loaded machine) as
            its retry-after says: the refused attempt must not have spent the budget."""
            for _ in range(5):
                answer = await call(port, agent, "llm.internal", "/v1/models")
                if answer.status_code != 503 or "limit_store_unavailable" not in answer.text:
                    return answer
                await asyncio.sleep(int(answer.headers["retry-after"]))
            return answer

        answers = await asyncio.gather(*(as_an_sdk_would(a) for a in agents))
        codes = [a.status_code for a in answers]
        odd = {a.text for a in answers if a.status_code not in (200, 429)}
        assert codes.count(200) == 50, (sorted(codes), odd)
        refused = [a for a in answers if a.status_code != 200]
        assert {a.status_code for a in refused} == {429}, {a.text for a in refused}
        body = refused[0].json()["error"]
        assert body["type"] == "over_budget"
        assert "group/team/calls" in body["message"]
        assert int(refused[0].headers["retry-after"]) > 0


async def test_a_global_limit_is_shared_by_the_replicas(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    async with mesh(tmp_path, redis_server) as (_, port):
        answers = await asyncio.gather(
            *(call(port, "a1", "docs.internal", "/v1/models") for _ in range(60))
        )
        codes = [a.status_code for a in answers]
        # 20 per hour: a refill within the run is at most one more
        assert codes.count(200) in (20, 21), codes
        limited = next(a for a in answers if a.status_code == 429)
        assert limited.headers["x-ratelimit-limit"].startswith("20")
        assert "retry-after" in limited.headers


async def test_token_spend_never_passes_the_budget_under_concurrent_streams(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    """40 concurrent streamed completions from the official SDK against 400-token budgets:
    what is spent plus reserved never exceeds it, at any moment, and every admitted stream is
    settled to the usage the provider reported."""
    async with mesh(tmp_path, redis_server) as (cp, port):
        store = RedisStore(redis_server.url, timeout_s=2.0)
        peak = 0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                for state in await store.budgets("rule/"):
                    peak = max(peak, state.spent + state.reserved)
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())

        async def stream(n: int) -> tuple[str, int]:
            http = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(
                    limits=httpx.Limits(max_keepalive_connections=0)
                ),
                headers={"host": "llm.internal", "x-meshgate-agent": f"a{1 + n % 4}"},
                timeout=30,
            )
            client = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", http_client=http
            )
            try:
                chunks = await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": f"question {n}"}],
                    stream=True,
                )
                usage = 0
                async for chunk in chunks:
                    if chunk.usage is not None:  # the gateway asked for usage on our behalf
                        usage = chunk.usage.total_tokens
                return "ok", usage
            except openai.RateLimitError as exc:  # what an agent framework shows the model
                assert isinstance(exc.body, dict) and "is spent" in exc.message
                return str(exc.body["type"]), 0
            finally:
                await client.close()

        try:
            results = await asyncio.gather(*(stream(n) for n in range(40)))
        finally:
            sampling = False
            await sampler
        admitted = [usage for outcome, usage in results if outcome == "ok"]
        assert admitted and len(admitted) < 40, results
        assert all(u > 0 for u in admitted)  # usage came back in the stream
        refusals = [outcome for outcome, _ in results if outcome != "ok"]
        assert all("over_budget" in r for r in refusals), refusals[:3]
        start, _ = window_bounds("day", time.time())

        async def current() -> dict[str, Any]:
            return {s.budget: s for s in await store.budgets() if s.window_start == start}

        # the pacer settles when Envoy ends its stream, a moment after the client has read all
        deadline = time.monotonic() + 10
        while any(s.reserved for s in (await current()).values()):
            assert time.monotonic() < deadline, await current()
            await asyncio.sleep(0.05)
        states = await current()
        spent = sum(s.spent for b, s in states.items() if b.endswith("/tokens"))
        assert spent == sum(admitted)  # settled to what the provider reported
        assert all(s.reserved == 0 for s in states.values())
        await store.close()
        assert peak <= TOKENS * 4  # four agents, one counter each
        for state in states.values():
            assert state.spent <= state.limit
        # every call is an audit record; LLM calls carry model, tokens and cost
        llm_records = await until(
            lambda: (got := audit_records(cp, destination="llm")) and len(got) == 40 and got,
            timeout=20,
            what="40 llm audit records",
        )
        allowed = [r for r in llm_records if r.decision == "allowed"]
        assert len(allowed) == len(admitted)
        assert sorted(r.tokens_in + r.tokens_out for r in allowed) == sorted(admitted)
        assert all(r.model == "gpt-4o-mini" for r in allowed)
        # prices: 1 and 2 USD per million tokens = 1 and 2 micro-dollars per token
        assert all(r.cost_micro_usd == r.tokens_in + 2 * r.tokens_out for r in allowed)
        over = [r for r in llm_records if r.decision == "over_budget"]
        assert len(over) == len(refusals)
        assert all(r.reason.startswith("over_budget: rule/a") for r in over)

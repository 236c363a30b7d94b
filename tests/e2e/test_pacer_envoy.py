"""The pacer behind a real Envoy 1.40: its global-limits (Lua) and ext_proc filters call the
pacer over unix sockets, in front of a local mock upstream (plain, slow, streaming SSE,
hanging, reset).

The static filter configuration here is the one the policy translation generates (see
`filters` and `route`): what is tested is the pair Envoy + pacer, end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import grpc
import httpx
import openai
import pytest
from aiohttp import web
from builders import free_port
from google.protobuf import json_format
from harness import control_plane, write_policy

from meshgate.cli.gateway import start_gateway
from meshgate.demo.llm_provider import LlmProvider
from meshgate.pacer.ext_proc import PacerSettings
from meshgate.pacer.service import Pacer
from meshgate.pacing import spec
from meshgate.sidecar.bootstrap import limits_cluster, pacer_cluster
from meshgate.sidecar.envoy_process import find_envoy
from meshgate.xds.pacing import (
    GLOBAL_LIMITS_FILTER,
    PACER_FILTER,
    global_limit_filters,
    global_limits_route_config,
    pacer_filter,
    pacer_route_config,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit" / "pacer"))
from pacer_twins import FlakyStore
from test_ext_proc import Stream

pytestmark = pytest.mark.e2e

UPSTREAM = "upstream"
LLM_UPSTREAM = "llm"  # the demo provider (meshgate.demo.llm_provider), for the official SDKs
EXT = "type.googleapis.com/envoy.extensions."
LOG_FORMAT = {
    "code": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "pacer": "%DYNAMIC_METADATA(meshgate.pacer)%",
    "path": "%REQ(:PATH)%",
}


# --- the mock upstream ------------------------------------------------------------------


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _slow(request: web.Request) -> web.StreamResponse:
    """Headers at once, then the body after `ms`: a response in flight for that long."""
    resp = web.StreamResponse()
    resp.content_type = "text/plain"
    await resp.prepare(request)
    await resp.write(b"start\n")
    await asyncio.sleep(int(request.query.get("ms", "500")) / 1000)
    await resp.write(b"end\n")
    await resp.write_eof()
    return resp


async def _hang(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    for _ in range(600):
        await resp.write(b'data: {"choices":[]}\n\n')
        await asyncio.sleep(0.1)
    return resp


async def _reset(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    await resp.write(b'data: {"choices":[]}\n\n')
    await asyncio.sleep(0.3)
    assert request.transport is not None
    request.transport.abort()  # the upstream goes away mid-body
    return resp


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    echo = {
        "max_tokens_seen": body.get("max_completion_tokens", body.get("max_tokens")),
        "framing": [
            request.headers.get("content-length"),
            request.headers.get("transfer-encoding"),
        ],
    }
    if not body.get("stream"):
        return web.json_response({"model": body["model"], "usage": usage, **echo})
    resp = web.StreamResponse()
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    for word in ("he", "llo"):
        chunk = {"model": body["model"], "choices": [{"delta": {"content": word}}], **echo}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await asyncio.sleep(0.05)
    final = {"model": body["model"], "choices": [], "usage": usage}
    await resp.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
    await resp.write_eof()
    return resp


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/ok", _ok)
    app.router.add_get("/limited", _ok)
    app.router.add_get("/closed", _ok)
    app.router.add_get("/open", _ok)
    app.router.add_get("/nospec", _ok)
    app.router.add_get("/budget", _ok)
    app.router.add_get("/slow", _slow)
    app.router.add_get("/queue", _slow)
    app.router.add_get("/fair", _slow)
    app.router.add_get("/hang", _hang)
    app.router.add_get("/reset", _reset)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/hang/chat/completions", _hang)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


# --- the Envoy configuration the translation generates ----------------------------------


def _json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


LONGEST_WAIT_MS = 30_000


def filters() -> list[dict[str, Any]]:
    """Exactly what the translation generates (xds/pacing.py), then the router."""
    uses_both = SimpleNamespace(  # global_limit_filters reads only these fields
        agents=[
            SimpleNamespace(
                rules=[
                    SimpleNamespace(
                        rate_limit=SimpleNamespace(scope="global", on_store_failure=m),
                        enforced=True,
                    )
                    for m in ("open", "closed")
                ]
            )
        ]
    )
    return [
        *map(_json, global_limit_filters(uses_both)),  # type: ignore[arg-type]
        _json(pacer_filter(LONGEST_WAIT_MS)),
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": EXT + "filters.http.router.v3.Router"},
        },
    ]


def route(
    path: str,
    pace: spec.PaceSpec | None = None,
    limit: spec.GlobalLimit | None = None,
    agent: str | None = None,
) -> dict[str, Any]:
    match: dict[str, Any] = {"path": path}
    if agent is not None:
        match["headers"] = [{"name": "x-agent", "string_match": {"exact": agent}}]
    r: dict[str, Any] = {"match": match, "route": {"cluster": UPSTREAM, "timeout": "60s"}}
    per_filter: dict[str, Any] = {}
    if limit is not None:
        per_filter[GLOBAL_LIMITS_FILTER] = _json(global_limits_route_config("a", [limit]))
    if pace is not None:
        per_filter[PACER_FILTER] = _json(pacer_route_config(pace))
    if per_filter:
        r["typed_per_filter_config"] = per_filter
    return r


def sdk_route(api: str, pace: spec.PaceSpec) -> dict[str, Any]:
    """/sdk/<api>/v1/... to the demo provider's /v1/..., as a client SDK calls it."""
    r = route("", pace)
    r["match"] = {"prefix": f"/sdk/{api}/v1/"}
    r["route"].update(cluster=LLM_UPSTREAM, prefix_rewrite="/v1/")
    return r


def pace(agent: str, **kw: Any) -> spec.PaceSpec:
    return spec.PaceSpec(agent=agent, destination="dest", **kw)


LLM = spec.LlmSpec(
    "openai", models=("gpt-4o-mini",), max_tokens=100, prices=(spec.Price("*", "0.15", "0.60"),)
)


def routes() -> list[dict[str, Any]]:
    one_at_a_time = spec.ConcurrencySpec("dest/slow", 1, 5000, fair=True)
    return [
        route("/ok"),
        route("/limited", limit=spec.GlobalLimit("a/limited", 2, 60, "open")),
        route("/closed", limit=spec.GlobalLimit("a/closed", 100, 60, "closed")),
        route("/open", limit=spec.GlobalLimit("a/open", 100, 60, "open")),
        route(
            "/budget",
            pace(
                "a",
                budgets=(spec.BudgetSpec("agent/a/daily", "requests", 2, "day"),),
            ),
        ),
        route("/slow", pace("a", concurrency=(one_at_a_time,))),
        route(
            "/queue",
            pace("a", concurrency=(spec.ConcurrencySpec("dest/queue", 1, 300),)),
        ),
        *[
            route(
                "/fair",
                pace(who, concurrency=(spec.ConcurrencySpec("dest/fair", 1, 30000, True),)),
                agent=who,
            )
            for who in ("a", "b")
        ],
        route("/hang", pace("a", concurrency=(spec.ConcurrencySpec("dest/hang", 1, 3000),))),
        route("/reset", pace("a", concurrency=(spec.ConcurrencySpec("dest/reset", 1, 3000),))),
        route(
            "/v1/chat/completions",
            pace(
                "a",
                budgets=(spec.BudgetSpec("agent/a/tokens", "tokens", 1_000_000, "day"),),
                concurrency=(spec.ConcurrencySpec("dest/llm", 4, 3000, True),),
                llm=LLM,
            ),
        ),
        route(
            "/hang/chat/completions",
            pace(
                "a",
                budgets=(spec.BudgetSpec("agent/a/hang", "tokens", 1_000_000, "day"),),
                concurrency=(spec.ConcurrencySpec("dest/llm-hang", 1, 3000),),
                llm=LLM,
            ),
        ),
        *[
            sdk_route(
                api,
                pace(
                    "a",
                    budgets=(spec.BudgetSpec(f"agent/a/{api}", "tokens", 1_000_000, "day"),),
                    concurrency=(spec.ConcurrencySpec(f"dest/{api}", 2, 3000, True),),
                    llm=spec.LlmSpec(api, (), 64, (spec.Price("*", "1", "2"),)),
                ),
            )
            for api in ("openai", "anthropic")
        ],
        {  # ext_proc on, but no PaceSpec in its metadata
            **route("/nospec"),
            "typed_per_filter_config": {
                PACER_FILTER: {
                    "@type": EXT + "filters.http.ext_proc.v3.ExtProcPerRoute",
                    "overrides": {"grpc_initial_metadata": [{"key": "x-other", "value": "1"}]},
                }
            },
        },
    ]


def envoy_config(
    tmp: Path, listen: int, upstream_port: int, llm_port: int, pacer_socket: Path
) -> dict[str, Any]:
    hcm = {
        "@type": EXT + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gw",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes()}]},
        "http_filters": filters(),
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": EXT + "access_loggers.file.v3.FileAccessLog",
                    "path": str(tmp / "access.log"),
                    "log_format": {"json_format": LOG_FORMAT},
                },
            }
        ],
    }
    return {
        "admin": {"address": {"pipe": {"path": str(tmp / "admin.sock")}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "gw",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                tcp_cluster(UPSTREAM, upstream_port),
                tcp_cluster(LLM_UPSTREAM, llm_port),
                _json(pacer_cluster(pacer_socket)),  # the gateway bootstrap's
                _json(limits_cluster(pacer_socket.with_name(spec.LIMITS_SOCKET))),
            ],
        },
    }


def tcp_cluster(name: str, port: int) -> dict[str, Any]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return {
        "name": name,
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


# --- fixtures ---------------------------------------------------------------------------


class Gateway:
    def __init__(
        self, base: str, store: FlakyStore, pacer: Pacer, log: Path, provider: LlmProvider
    ) -> None:
        self.provider = provider
        self.base = base
        self.store = store
        self.pacer = pacer
        self.log = log

    def records(self, path: str) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [r for r in map(json.loads, lines) if path in r["path"]]

    async def record(self, path: str, n: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(found := self.records(path)) < n:
            assert time.monotonic() < deadline, f"no {n} access-log records for {path}"
            await asyncio.sleep(0.1)
        return found

    async def until(self, check: Any, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "condition not met in time"
            await asyncio.sleep(0.05)


@pytest.fixture
def pacer_parts(tmp_path: Path) -> Iterator[tuple[FlakyStore, Pacer]]:
    store = FlakyStore()
    pacer = Pacer(tmp_path / "pacer.sock", lambda: store, PacerSettings())
    pacer.start()
    try:
        yield store, pacer
    finally:
        pacer.stop()


@pytest.fixture
async def gateway(tmp_path: Path, pacer_parts: tuple[FlakyStore, Pacer]) -> AsyncIterator[Gateway]:
    store, pacer = pacer_parts
    provider = LlmProvider(reply_tokens=5, token_delay=0.02)
    llm_port = await provider.start()
    async with upstream() as up:
        listen = free_port()
        cfg = tmp_path / "envoy.json"
        cfg.write_text(json.dumps(envoy_config(tmp_path, listen, up, llm_port, pacer.socket)))
        log = (tmp_path / "envoy.log").open("w")
        proc = subprocess.Popen(
            [
                find_envoy(),
                "-c",
                str(cfg),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--file-flush-interval-msec",
                "50",
                "-l",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{listen}"
        try:
            async with httpx.AsyncClient() as client:
                deadline = time.monotonic() + 30
                while True:
                    assert proc.poll() is None, (tmp_path / "envoy.log").read_text()
                    try:
                        if (await client.get(base + "/ok")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "envoy did not start"
                    await asyncio.sleep(0.1)
            yield Gateway(base, store, pacer, tmp_path / "access.log", provider)
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
            await provider.stop()


async def get(gw: Gateway, path: str, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(gw.base + path, **kw)


# --- tests ------------------------------------------------------------------------------


async def test_global_limit_is_429_with_ratelimit_headers_and_retry_after(gateway: Gateway) -> None:
    first = await get(gateway, "/limited")
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit"].startswith("2, 2;w=60")
    assert first.headers["x-ratelimit-remaining"] == "1"
    assert (await get(gateway, "/limited")).status_code == 200
    refused = await get(gateway, "/limited")
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 30  # one token back at 2/60s
    assert refused.json()["error"] == "rate_limited" and refused.json()["limit"] == "a/limited"
    records = await gateway.record("/limited", 3)
    assert (records[-1]["code"], records[-1]["details"]) == (429, "lua_response")


async def test_store_down_fails_each_limit_its_own_way(gateway: Gateway) -> None:
    gateway.store.down = True
    assert (await get(gateway, "/open")).status_code == 200
    closed = await get(gateway, "/closed")
    assert closed.status_code == 503
    assert closed.json()["error"] == spec.STORE_UNAVAILABLE
    (record,) = await gateway.record("/closed")
    assert (record["code"], record["details"]) == (503, "lua_response")


async def test_a_silent_pacer_fails_each_limit_its_own_way(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer at all (a hung pacer): the filter gives up after its own timeout and applies
    the failure modes itself."""
    leases = gateway.pacer.leases
    assert leases is not None

    async def hang(limit: spec.GlobalLimit) -> None:
        await asyncio.sleep(30)

    monkeypatch.setattr(leases, "try_now", lambda limit: None)
    monkeypatch.setattr(leases, "hit", hang)
    started = time.monotonic()
    assert (await get(gateway, "/open")).status_code == 200
    closed = await get(gateway, "/closed")
    assert time.monotonic() - started < 6  # two calls, each bounded by the filter's 1.5 s
    assert closed.status_code == 503
    assert closed.json()["error"] == spec.STORE_UNAVAILABLE and closed.json()["agent"] == "a"
    (record,) = await gateway.record("/closed")
    assert (record["code"], record["details"]) == (503, "lua_response")


async def test_a_route_without_a_pace_spec_is_refused(gateway: Gateway) -> None:
    r = await get(gateway, "/nospec")
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "pace_spec_invalid"
    (record,) = await gateway.record("/nospec")
    assert record["details"] == "pace_spec_invalid"


async def test_budget_refusal_names_budget_spent_reserved_limit_and_reset(
    gateway: Gateway,
) -> None:
    assert (await get(gateway, "/budget")).status_code == 200
    assert (await get(gateway, "/budget")).status_code == 200
    refused = await get(gateway, "/budget")
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == spec.OVER_BUDGET
    assert error["budget"] == "agent/a/daily"
    assert (error["spent"], error["reserved"], error["limit"]) == (2, 0, 2)
    _, end = spec.window_bounds("day", time.time())
    assert error["resets_at"].startswith(time.strftime("%Y-%m-%dT00:00:00", time.gmtime(end)))
    assert abs(int(refused.headers["retry-after"]) - (end - time.time())) < 5
    records = await gateway.record("/budget", 3)
    assert records[-1]["details"] == spec.OVER_BUDGET
    assert records[-1]["pacer"]["budget"] == "agent/a/daily"


async def test_a_request_waits_for_a_slot_longer_than_envoys_message_timeout(
    gateway: Gateway,
) -> None:
    started = time.monotonic()
    first = asyncio.create_task(get(gateway, "/slow?ms=2600"))
    await gateway.until(lambda: gateway.pacer.limiter.in_flight("dest/slow") == 1)
    second = await get(gateway, "/slow?ms=10")
    assert second.status_code == 200  # waited ~2.6 s > message_timeout 2 s: not cut
    assert time.monotonic() - started >= 2.5
    assert (await first).status_code == 200
    records = await gateway.record("/slow", 2)
    waited = [r["pacer"]["queued_ms"] for r in records]
    assert max(waited) >= 2100, records
    await gateway.until(lambda: gateway.pacer.limiter.in_flight("dest/slow") == 0)


async def test_queue_timeout_is_503_saying_how_long_it_waited(gateway: Gateway) -> None:
    first = asyncio.create_task(get(gateway, "/queue?ms=1500"))
    await gateway.until(lambda: gateway.pacer.limiter.in_flight("dest/queue") == 1)
    refused = await get(gateway, "/queue?ms=10")
    assert refused.status_code == 503
    assert "retry-after" in refused.headers
    error = refused.json()["error"]
    assert error["type"] == spec.QUEUE_TIMEOUT
    assert 250 <= error["waited_ms"] <= 1000 and error["max_wait_ms"] == 300
    assert "waited 0." in error["message"]
    assert (await first).status_code == 200
    records = await gateway.record("/queue", 2)
    assert spec.QUEUE_TIMEOUT in [r["details"] for r in records]


async def test_one_agents_flood_does_not_starve_another(gateway: Gateway) -> None:
    done: list[str] = []
    limiter = gateway.pacer.limiter

    async def one(agent: str) -> None:
        r = await get(gateway, "/fair?ms=400", headers={"x-agent": agent})
        assert r.status_code == 200
        done.append(agent)

    flood = [asyncio.create_task(one("a")) for _ in range(8)]
    await gateway.until(lambda: limiter.waiting("dest/fair") >= 7)
    b = asyncio.create_task(one("b"))
    await gateway.until(lambda: limiter.waiting_of("dest/fair", "b") == 1)
    queued_after = len(done)
    await asyncio.gather(*flood, b)
    # b queued behind 7 of a's: it is served after the one in flight and at most one more
    assert done.index("b") <= queued_after + 2, (queued_after, done)
    assert done.index("b") < 4, done


async def test_streamed_llm_call_settles_with_the_real_usage(gateway: Gateway) -> None:
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(gateway.base + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert '"max_tokens_seen": 100' in r.text  # the route's ceiling was injected
    store = gateway.store
    await gateway.until(lambda: len(store.settled) == 1)
    (actual,) = store.settled.values()
    assert actual == {"agent/a/tokens": 18}
    assert store.spent["agent/a/tokens"] == 18 and store.reserved["agent/a/tokens"] == 0
    (record,) = await gateway.record("/v1/chat")
    assert record["pacer"]["model"] == "gpt-4o-mini"
    assert (record["pacer"]["tokens_in"], record["pacer"]["tokens_out"]) == (11, 7)
    assert record["pacer"]["cost_micro_usd"] == 6  # ceil(11 * 0.15 + 7 * 0.60)
    assert gateway.pacer.limiter.in_flight("dest/llm") == 0


async def test_a_chunked_llm_body_is_forwarded_rewritten_with_its_new_length(
    gateway: Gateway,
) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:10].encode()
        yield body[10:].encode()

    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(gateway.base + "/v1/chat/completions", content=chunks())
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["max_tokens_seen"] == 100
    length, transfer_encoding = answer["framing"]
    assert transfer_encoding is None and int(length) > len(body)  # one framing, the new size


async def test_llm_refusals(gateway: Gateway) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        url = gateway.base + "/v1/chat/completions"
        wrong = await client.post(url, json={"model": "gpt-5", "messages": []})
        big = await client.post(url, json={"model": "gpt-4o-mini", "max_tokens": 101})
    assert wrong.status_code == 403 and wrong.json()["error"]["type"] == spec.MODEL_NOT_ALLOWED
    assert big.status_code == 400 and big.json()["error"]["type"] == spec.MAX_TOKENS_EXCEEDED
    records = await gateway.record("/v1/chat", 2)
    assert {r["details"] for r in records} == {spec.MODEL_NOT_ALLOWED, spec.MAX_TOKENS_EXCEEDED}
    assert gateway.store.reserved == {}


async def test_a_slot_is_held_until_the_response_ends(gateway: Gateway) -> None:
    task = asyncio.create_task(get(gateway, "/slow?ms=800"))
    await gateway.until(lambda: gateway.pacer.limiter.in_flight("dest/slow") == 1)
    await asyncio.sleep(0.5)  # headers came back long ago; the body is still streaming
    assert gateway.pacer.limiter.in_flight("dest/slow") == 1
    assert (await task).status_code == 200
    await gateway.until(lambda: gateway.pacer.limiter.in_flight("dest/slow") == 0, timeout=3)


async def test_client_disconnect_releases_the_slot_and_charges_in_full(gateway: Gateway) -> None:
    limiter, store = gateway.pacer.limiter, gateway.store
    for path, key in (("/hang", "dest/hang"), ("/hang/chat/completions", "dest/llm-hang")):
        async with httpx.AsyncClient(timeout=30) as client:
            method = "GET" if path == "/hang" else "POST"
            body = {"model": "gpt-4o-mini", "max_tokens": 50, "stream": True}
            req = client.build_request(
                method, gateway.base + path, json=body if method == "POST" else None
            )
            resp = await client.send(req, stream=True)
            assert resp.status_code == 200
            async for _ in resp.aiter_bytes():
                break
            assert limiter.in_flight(key) == 1
            await resp.aclose()
        await gateway.until(lambda key=key: limiter.in_flight(key) == 0, timeout=5)
    await gateway.until(lambda: len(store.settled) == 1)
    assert store.settled[next(iter(store.settled))] == {}  # no usage seen: charged in full
    assert store.reserved["agent/a/hang"] == 0 and store.spent["agent/a/hang"] > 50


async def test_upstream_reset_releases_the_slot(gateway: Gateway) -> None:
    with contextlib.suppress(httpx.HTTPError):
        await get(gateway, "/reset")
    await gateway.until(lambda: gateway.pacer.limiter.in_flight("dest/reset") == 0, timeout=5)
    assert gateway.pacer.limiter.keys() == 0


async def test_a_client_giving_up_while_queued_leaves_the_queue(gateway: Gateway) -> None:
    limiter = gateway.pacer.limiter
    first = asyncio.create_task(get(gateway, "/slow?ms=1500"))
    await gateway.until(lambda: limiter.in_flight("dest/slow") == 1)
    async with httpx.AsyncClient(timeout=0.4) as client:
        with pytest.raises(httpx.TimeoutException):
            await client.get(gateway.base + "/slow?ms=10")
    await gateway.until(lambda: limiter.waiting("dest/slow") == 0, timeout=3)
    assert limiter.in_flight("dest/slow") == 1  # only the first
    assert (await first).status_code == 200
    await gateway.until(lambda: limiter.keys() == 0)


async def test_without_its_pacer_a_paced_route_is_refused(gateway: Gateway) -> None:
    gateway.pacer.stop()
    assert (await get(gateway, "/ok")).status_code == 200  # unpaced routes still serve
    assert (await get(gateway, "/budget")).status_code == 500  # ext_proc fails closed
    assert (await get(gateway, "/closed")).status_code == 503  # so does a closed limit
    assert (await get(gateway, "/open")).status_code == 200  # an open one fails open


async def test_official_openai_sdk_streams_and_is_settled_with_its_usage(gateway: Gateway) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.base + "/sdk/openai/v1", api_key="k")
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,  # no stream_options: the pacer asks for the usage itself
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.strip() == "ok ok ok ok ok"
    (seen,) = gateway.provider.seen
    assert seen.body["max_completion_tokens"] == 64  # the route's ceiling, injected
    store = gateway.store
    await gateway.until(lambda: store.settled != {})
    (actual,) = store.settled.values()
    (record,) = await gateway.record("/v1/chat/completions")  # the rewritten path
    tokens_in, tokens_out = record["pacer"]["tokens_in"], record["pacer"]["tokens_out"]
    assert tokens_out == 5 and tokens_in > 0
    assert actual == {"agent/a/openai": tokens_in + tokens_out}
    assert store.reserved["agent/a/openai"] == 0
    assert record["pacer"]["cost_micro_usd"] == tokens_in * 1 + tokens_out * 2


async def test_official_anthropic_sdk_is_refused_over_its_ceiling_and_settled_below(
    gateway: Gateway,
) -> None:
    client = anthropic.AsyncAnthropic(base_url=gateway.base + "/sdk/anthropic", api_key="k")
    with pytest.raises(anthropic.BadRequestError) as refused:
        await client.messages.create(
            model="claude-x", max_tokens=65, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.body["error"]["type"] == spec.MAX_TOKENS_EXCEEDED  # type: ignore[index]
    async with client.messages.stream(
        model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text.strip() == "ok ok ok ok ok"
    await gateway.until(lambda: gateway.store.spent.get("agent/a/anthropic", 0) > 0)
    assert gateway.store.reserved["agent/a/anthropic"] == 0
    (_, record) = await gateway.record("/v1/messages", 2)
    assert record["pacer"]["tokens_out"] == 5


async def test_meshgate_gateway_runs_a_pacer_that_counts_in_the_control_planes_store(
    tmp_path: Path,
) -> None:
    """`start_gateway` (what `meshgate gateway` runs): Envoy bootstrapped with the pacer's
    cluster, and the pacer spending from the control plane's store with the gateway's token."""
    policies = tmp_path / "policies"
    write_policy(policies, free_port(), {"alpha": free_port()})
    state = tmp_path / "state"
    async with control_plane(policies, state, require_tokens=True) as cp:
        assert cp.tokens is not None
        token, _ = cp.tokens.create("gateway/egress", 600)
        token_file = tmp_path / "token"
        token_file.write_text(token)
        gw = await start_gateway(
            cp.xds_address,
            "egress",
            tmp_path / "gw-state",
            False,
            1,
            wait_ready=True,
            token_file=token_file,
            insecure=True,  # plaintext xDS in this test; the join token is still required
        )
        try:
            clusters = (await asyncio.to_thread(gw.admin.get, "/clusters")).text
            assert f"{spec.PACER_CLUSTER}::" in clusters
            assert gw.pacer.socket.parent == Path(gw.admin.socket).parent
            pace = spec.PaceSpec(
                "coder", "alpha", (spec.BudgetSpec("agent/coder/daily", "requests", 1, "day"),)
            )
            async with grpc.aio.insecure_channel(f"unix:{gw.pacer.socket}") as channel:
                first = Stream(channel, pace)
                assert (await first.headers()).HasField("request_headers")
                await first.end()
                refused = await Stream(channel, pace).headers()
                assert refused.immediate_response.details == spec.OVER_BUDGET
            assert cp.limit_store is not None
            (state_row,) = await cp.limit_store.budgets("agent/coder/")
            assert (state_row.spent, state_row.reserved, state_row.limit) == (1, 0, 1)
        finally:
            await gw.stop()
        assert not gw.pacer.socket.exists()


async def test_clients_vanishing_together_leave_no_slot_held(gateway: Gateway) -> None:
    """Ten requests on a cap of one (one in flight, the rest queued), every client gone at
    once: Envoy resets the streams, and the cap is free again for the next request."""
    limiter = gateway.pacer.limiter
    clients = [httpx.AsyncClient(timeout=30) for _ in range(10)]
    calls = [asyncio.create_task(c.get(gateway.base + "/slow?ms=300")) for c in clients]
    await gateway.until(lambda: limiter.waiting("dest/slow") >= 5)
    for call in calls:
        call.cancel()
    for c in clients:
        await c.aclose()
    await gateway.until(lambda: limiter.in_flight("dest/slow") == 0 == limiter.waiting("dest/slow"))
    assert (await get(gateway, "/slow?ms=10")).status_code == 200

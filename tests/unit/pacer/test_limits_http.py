"""The pacer's global-limit endpoint over its unix socket: answers, failure modes, refusals."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator

import httpx
import pytest
from limits_client import ask, client, limit, verdict
from pacer_twins import FlakyStore

from meshgate.pacer.service import Pacer
from meshgate.pacing import spec


@pytest.fixture
async def http(pacer: Pacer) -> AsyncIterator[httpx.AsyncClient]:
    async with client(pacer) as c:
        yield c


def test_both_sockets_are_owner_only(pacer: Pacer) -> None:
    assert stat.S_IMODE(pacer.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(pacer.limits_socket.stat().st_mode) == 0o600


async def test_counts_down_then_refuses_with_retry_after(http: httpx.AsyncClient) -> None:
    first = await ask(http, limit(n=2))
    assert (first.status_code, verdict(first)) == (200, "ok")
    assert first.headers["x-ratelimit-limit"] == "2, 2;w=60"
    assert first.headers["x-ratelimit-remaining"] == "1"
    assert (await ask(http, limit(n=2))).status_code == 200
    refused = await ask(http, limit(n=2))
    assert (refused.status_code, verdict(refused)) == (429, "over")
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert refused.headers["x-ratelimit-remaining"] == "0"
    body = refused.json()
    assert body["error"] == "rate_limited" and body["limit"] == "a/d/0" and body["agent"] == "a"
    assert "2 requests per 60 s" in body["reason"]


async def test_one_limit_over_refuses_the_request(http: httpx.AsyncClient) -> None:
    await ask(http, limit("x/d/0", 1))
    both = await ask(http, limit("x/d/0", 1), limit("y/d/0", 5))
    assert both.status_code == 429 and both.json()["limit"] == "x/d/0"


@pytest.mark.parametrize(
    "query",
    [
        "key=a&limit=0/60&failure=open",
        "key=a&limit=2/60",
        "generic_key=x",
        "key=a&limit=2/60&failure=maybe",
        "limit=2/60&key=a&failure=open",
        "key=&limit=2/60&failure=open",
        "",
    ],
)
async def test_a_query_it_cannot_read_is_refused(http: httpx.AsyncClient, query: str) -> None:
    r = await http.get(f"{spec.LIMITS_PATH}?{query}")
    assert (r.status_code, verdict(r)) == (403, "invalid")
    assert r.json()["error"] == "limit_spec_invalid"


async def test_another_path_is_refused(http: httpx.AsyncClient) -> None:
    r = await http.get(f"/v2/limits?{spec.limits_query([limit()])}")
    assert (r.status_code, verdict(r)) == (403, "invalid")


async def test_a_request_with_a_body_is_a_protocol_error(http: httpx.AsyncClient) -> None:
    r = await http.post(f"{spec.LIMITS_PATH}?{spec.limits_query([limit()])}", content=b"x")
    assert r.status_code == 400


async def test_store_down_open_allows_closed_refuses(
    http: httpx.AsyncClient, store: FlakyStore
) -> None:
    store.down = True
    opened = await ask(http, limit("o/d/0", failure="open"))
    assert (opened.status_code, verdict(opened)) == (200, "ok")
    closed = await ask(http, limit("c/d/0", failure="closed"))
    assert (closed.status_code, verdict(closed)) == (503, "unavailable")
    assert closed.json()["error"] == spec.STORE_UNAVAILABLE and closed.headers["retry-after"]


async def test_a_slow_store_is_a_down_store(http: httpx.AsyncClient, store: FlakyStore) -> None:
    store.delay = 2.0  # beyond the pacer's bound on one store call (service.LIMITS_TIMEOUT_S)
    assert (await ask(http, limit("o/d/0", failure="open"))).status_code == 200
    assert (await ask(http, limit("c/d/0", failure="closed"))).status_code == 503


async def test_decisions_are_counted(http: httpx.AsyncClient, pacer: Pacer) -> None:
    await ask(http, limit("m/d/0", 1))
    await ask(http, limit("m/d/0", 1))
    text = pacer.metrics.exposition().decode()
    assert 'meshgate_pacer_decisions_total{decision="ok",kind="global_limit"} 1.0' in text
    assert 'meshgate_pacer_decisions_total{decision="over_limit",kind="global_limit"} 1.0' in text


async def test_pipelined_questions_are_answered_in_order(pacer: Pacer, store: FlakyStore) -> None:
    """A slow first answer (a store call) never lets a quick second one overtake it."""
    store.delay = 0.1
    reader, writer = await asyncio.open_unix_connection(str(pacer.limits_socket))
    try:
        first = spec.limits_query([limit("p/d/0", 5)])
        second = "key=&limit=1/1&failure=open"  # invalid: answered at once
        for q in (first, second):
            writer.write(f"GET {spec.LIMITS_PATH}?{q} HTTP/1.1\r\nhost: p\r\n\r\n".encode())
        await writer.drain()
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk
            data += chunk
        assert data.index(b"200 OK") < data.index(b"403 Forbidden")
    finally:
        writer.close()

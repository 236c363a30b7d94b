"""`GET /v1/audit` and `/v1/audit/summary` on a real aiohttp server over a real store."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from audit_fixtures import make_record

from meshgate.audit.http import add_audit_routes
from meshgate.audit.sqlbase import SqlAuditStore
from meshgate.audit.store import AuditLogStore


@pytest.fixture
async def client(store: SqlAuditStore) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    # "now" per test: relative filters (`since=30m`) must not drift with the suite's run time
    now = dt.datetime.now(dt.UTC)
    store.append([make_record(i, timestamp=now - dt.timedelta(minutes=40 - i)) for i in range(40)])
    app = web.Application()
    add_audit_routes(app, lambda: store)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_filters_and_pages(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/v1/audit", params={"agent": "a1", "since": "30m", "limit": "3"})
    assert resp.status == 200
    body = await resp.json()
    assert [r["request_id"] for r in body["records"]] == ["req-000037", "req-000034", "req-000031"]
    seen = [r["request_id"] for r in body["records"]]
    while body["next_cursor"]:
        resp = await client.get(
            "/v1/audit",
            params={"agent": "a1", "since": "30m", "limit": "3", "cursor": body["next_cursor"]},
        )
        body = await resp.json()
        seen += [r["request_id"] for r in body["records"]]
    assert seen == [f"req-{i:06d}" for i in range(37, 10, -3)]  # ages < 30 min: i >= 11


async def test_decision_and_destination(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/v1/audit", params={"decision": "denied", "destination": "d1"})
    records = (await resp.json())["records"]
    assert records and {(r["decision"], r["destination"]) for r in records} == {("denied", "d1")}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"decision": "nope"}, "decision: 'nope' is not one of"),
        ({"since": "yesterdayish"}, "since: 'yesterdayish' is neither"),
        ({"limit": "0"}, "limit: must be between 1 and 10000"),
        ({"cursor": "??"}, "cursor: '??' is not a cursor"),
    ],
)
async def test_bad_parameters_are_400(
    client: TestClient[web.Request, web.Application], params: dict[str, str], message: str
) -> None:
    resp = await client.get("/v1/audit", params=params)
    assert resp.status == 400
    assert (await resp.json())["error"].startswith(message)


async def test_summary(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/v1/audit/summary")
    body = await resp.json()
    assert resp.status == 200 and body["total"] == 40 and body["until"] is None
    assert {"agent": "a0", "destination": "d0", "decision": "allowed", "count": 4} in body["rows"]
    resp = await client.get("/v1/audit/summary", params={"since": "630s"})
    assert (await resp.json())["total"] == 10  # ages 1..10 minutes
    resp = await client.get("/v1/audit/summary", params={"since": "1h", "until": "2h"})
    assert resp.status == 400 and (await resp.json())["error"] == "since must be before until"
    resp = await client.get("/v1/audit/summary", params={"since": "soon"})
    assert resp.status == 400 and "since" in (await resp.json())["error"]


async def test_audit_off_is_503() -> None:
    app = web.Application()

    def no_store() -> AuditLogStore | None:
        return None

    add_audit_routes(app, no_store)
    async with TestClient(TestServer(app)) as test_client:
        for path in ("/v1/audit", "/v1/audit/summary"):
            resp = await test_client.get(path)
            assert resp.status == 503 and "not enabled" in (await resp.json())["error"]

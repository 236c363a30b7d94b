"""Admin HTTP for the audit log: `GET /v1/audit` (filtered, paged) and `GET /v1/audit/summary`.

Parameters are parsed by `audit.query`, exactly as the CLI parses its options; bad input is a 400
with `{"error": ...}` naming the parameter. Store calls run in a thread: they block on disk.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

from aiohttp import web

from meshgate.audit.query import build_query, parse_instant
from meshgate.audit.store import SUMMARY_DEFAULT, AuditLogStore
from meshgate.errors import MeshgateError

StoreGetter = Callable[[], AuditLogStore | None]
PARAMS = ("agent", "destination", "decision", "tool", "since", "until", "limit", "cursor")
NAMES = {name: name for name in PARAMS}
DEFAULT_SUMMARY_SINCE = "24h"


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


def add_audit_routes(app: web.Application, store_getter: StoreGetter) -> None:
    """Register the audit routes; `store_getter()` returns None while the audit log is off."""

    async def records(request: web.Request) -> web.Response:
        store = store_getter()
        if store is None:
            return _error("the audit log is not enabled on this control plane", 503)
        args: dict[str, Any] = {k: request.query[k] for k in PARAMS if k in request.query}
        try:
            query = build_query(**args, names=NAMES)
            page = await asyncio.to_thread(store.query, query)
        except MeshgateError as exc:
            return _error(str(exc), 400)
        return web.json_response(
            {"records": [r.to_json() for r in page.records], "next_cursor": page.next_cursor}
        )

    async def summary(request: web.Request) -> web.Response:
        store = store_getter()
        if store is None:
            return _error("the audit log is not enabled on this control plane", 503)
        now = dt.datetime.now(dt.UTC)
        try:
            since = parse_instant(request.query.get("since", DEFAULT_SUMMARY_SINCE), "since", now)
            until_text = request.query.get("until")
            until = parse_instant(until_text, "until", now) if until_text else None
            if until is not None and since >= until:
                return _error("since must be before until", 400)
            by = tuple(request.query.get("by", ",".join(SUMMARY_DEFAULT)).split(","))
            rows = await asyncio.to_thread(store.summary, since, until, by)
        except MeshgateError as exc:
            return _error(str(exc), 400)
        return web.json_response(
            {
                "since": since.isoformat(),
                "until": until.isoformat() if until else None,
                "total": sum(r.count for r in rows),
                "by": list(by),
                "rows": [r.to_json(by) for r in rows],
            }
        )

    app.router.add_get("/v1/audit", records)
    app.router.add_get("/v1/audit/summary", summary)

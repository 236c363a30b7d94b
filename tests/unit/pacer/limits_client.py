"""Asks a pacer's global-limit endpoint what the gateway's limits filter asks."""

from __future__ import annotations

import httpx

from meshgate.pacer.service import Pacer
from meshgate.pacing import spec


def limit(key: str = "a/d/0", n: int = 2, per: int = 60, failure: str = "open") -> spec.GlobalLimit:
    return spec.GlobalLimit(key, n, per, failure)  # type: ignore[arg-type]


def client(pacer: Pacer) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(pacer.limits_socket))
    return httpx.AsyncClient(transport=transport, base_url="http://meshgate-pacer", timeout=5)


async def ask(http: httpx.AsyncClient, *limits: spec.GlobalLimit) -> httpx.Response:
    return await http.get(f"{spec.LIMITS_PATH}?{spec.limits_query(list(limits))}")


def verdict(r: httpx.Response) -> str:
    return r.headers[spec.LIMITS_VERDICT_HEADER]

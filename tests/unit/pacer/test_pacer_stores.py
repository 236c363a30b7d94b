"""The pacer on the stores a gateway really uses: Redis (`--limit-store`) and the control
plane's embedded store over gRPC (RemoteStore), including Redis stalling mid-run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from limits_client import ask, client, limit
from pacing_redis import RedisProcess, redis_server  # noqa: F401 (fixture)
from test_ext_proc import Stream, held, http_headers

from meshgate.pacer import stores
from meshgate.pacer.ext_proc import PacerSettings
from meshgate.pacer.service import Pacer
from meshgate.pacer.stores import store_factory
from meshgate.pacing import spec
from meshgate.pacing.memory_store import MemoryStore
from meshgate.pacing.store import StoreUnavailable
from meshgate.pacing.store_service import store_service_handler


@pytest.fixture
async def control_plane_store() -> AsyncIterator[tuple[str, MemoryStore]]:
    store = MemoryStore()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((store_service_handler(store),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", store
    finally:
        await server.stop(None)


def start(tmp_path: Path, limit_store: str | None, control_plane: str) -> Pacer:
    factory = store_factory(
        limit_store, password_file=None, control_plane=control_plane, ca_file=None, metadata=()
    )
    pacer = Pacer(tmp_path / "pacer.sock", factory, PacerSettings(store_timeout_s=0.3))
    pacer.start()
    return pacer


@pytest.fixture
def redis_pacer(tmp_path: Path, redis_server: RedisProcess) -> Iterator[Pacer]:  # noqa: F811
    pacer = start(tmp_path, redis_server.url, "127.0.0.1:1")
    yield pacer
    pacer.stop()


async def budget_then_refusal(pacer: Pacer) -> None:
    async with client(pacer) as http:
        assert (await ask(http, limit("k", 1))).status_code == 200
        assert (await ask(http, limit("k", 1))).status_code == 429
    async with grpc.aio.insecure_channel(f"unix:{pacer.socket}") as channel:
        pace = held(budgets=(spec.BudgetSpec("agent/a/b", "requests", 1, "day"),))
        first = Stream(channel, pace)
        assert (await first.headers()).HasField("request_headers")
        await first.end()
        refused = await Stream(channel, pace).headers()
        assert refused.immediate_response.details == spec.OVER_BUDGET


async def test_on_redis(redis_pacer: Pacer) -> None:
    await budget_then_refusal(redis_pacer)


async def test_on_the_control_planes_store(
    tmp_path: Path, control_plane_store: tuple[str, MemoryStore]
) -> None:
    address, store = control_plane_store
    pacer = start(tmp_path, None, address)
    try:
        await budget_then_refusal(pacer)
    finally:
        pacer.stop()
    (state,) = await store.budgets("agent/a/")
    assert (state.spent, state.reserved) == (1, 0)  # counted there, settled there


async def test_redis_stalled_fails_each_way_within_bounded_time(
    redis_pacer: Pacer,
    redis_server: RedisProcess,  # noqa: F811
) -> None:
    async with (
        client(redis_pacer) as http,
        grpc.aio.insecure_channel(f"unix:{redis_pacer.socket}") as channel,
    ):
        assert (await ask(http, limit("warm", 5))).status_code == 200
        redis_server.pause()
        try:
            started = time.monotonic()
            assert (await ask(http, limit("o", 5, failure="open"))).status_code == 200
            assert (await ask(http, limit("c", 5, failure="closed"))).status_code == 503
            closed = held(budgets=(spec.BudgetSpec("c", "requests", 5, "day", "closed"),))
            s = Stream(channel, closed)
            await s.send(ep.ProcessingRequest(request_headers=http_headers({":path": "/"})))
            refused = await s.recv()
            assert refused.immediate_response.details == spec.STORE_UNAVAILABLE
            assert time.monotonic() - started < 2  # bounded by the store and pacer timeouts
        finally:
            redis_server.resume()


async def test_the_join_token_is_renewed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stores, "TOKEN_REFRESH_S", 0.0)

    def new_token_only(metadata: dict[str, str], peer: str) -> None:
        if metadata.get("authorization") != "Bearer new":
            raise PermissionError("expired")

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (store_service_handler(MemoryStore(), authorize=new_token_only),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    factory = stores.store_factory(
        None,
        password_file=None,
        control_plane=f"127.0.0.1:{port}",
        ca_file=None,
        metadata=(("authorization", "Bearer old"),),
        refresh_metadata=lambda: (("authorization", "Bearer new"),),
    )
    store = factory()
    try:
        with pytest.raises(StoreUnavailable):
            await store.hit("k", 5, 60)  # the old token; a renewal starts
        deadline = time.monotonic() + 5
        while True:
            try:
                assert (await store.hit("k", 5, 60)).allowed
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
    finally:
        await store.close()
        await server.stop(None)

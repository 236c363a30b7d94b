"""A slow or dead store costs each call at most its timeout, then nothing (circuit open), never
piles up calls, connections or memory, and recovers by itself. Real redis-server (SIGSTOP: slow,
SIGKILL: down) and a real grpc.aio server for RemoteStore."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
import pytest
import redis
from pacing_redis import RedisProcess
from store_backends import serve

from meshgate.pacing.breaker import CircuitBreaker
from meshgate.pacing.memory_store import MemoryStore
from meshgate.pacing.redis_store import RedisStore
from meshgate.pacing.remote_store import CHANNEL_OPTIONS, RemoteStore
from meshgate.pacing.store import (
    BudgetState,
    Charge,
    LimitStore,
    RateDecision,
    Reservation,
    StoreUnavailable,
)

TIMEOUT_S = 0.05
MARGIN_S = 0.15  # the loaded 2-core test machine's scheduling slack
FAST_S = 0.02  # a call refused by an open circuit


def connections_received(server: RedisProcess) -> int:
    with redis.Redis(port=server.port, socket_timeout=5) as admin:
        stats: dict[str, Any] = admin.info("stats")
        return int(stats["total_connections_received"])


async def timed(call: Any) -> tuple[float, BaseException | None]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        await call
    except BaseException as e:
        return loop.time() - start, e
    return loop.time() - start, None


async def until_ok(store: LimitStore, within_s: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < within_s:
        try:
            await store.hit("probe", 1_000_000, 1)
            return loop.time() - start
        except StoreUnavailable:
            await asyncio.sleep(0.02)
    raise AssertionError(f"store not back within {within_s} s")


class Lag:
    """How late the event loop runs (this machine is shared): a call's bound is its timeout
    plus a margin plus the worst lateness seen meanwhile, which no store can help."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, loop.time() - start - 0.005)

    def bound(self, seconds: float) -> float:
        return seconds + self.worst


@pytest.fixture
async def lag() -> AsyncIterator[Lag]:
    meter = Lag()
    task = asyncio.create_task(meter._tick())
    try:
        yield meter
    finally:
        task.cancel()


async def admitted_again(store: LimitStore, reservation: str, within_s: float = 3.0) -> bool:
    """Reserve until the store answers (the same id: applied once however often sent)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return (await store.reserve(reservation, [Charge("b", 5, 1, 0, 2**40)], 60)).admitted
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def tasks() -> int:
    return len(asyncio.all_tasks())


async def drained(store: RedisStore | RemoteStore) -> None:
    """Calls that timed out end in the background (client clean-up); wait for them."""
    for _ in range(300):
        if store.guard.in_flight == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{store.guard.in_flight} calls still in flight after 3 s")


async def test_redis_paused_each_call_bounded_then_circuit_open_then_recovers(
    redis_server: RedisProcess, lag: Lag
) -> None:
    store = RedisStore(
        redis_server.url,
        timeout_s=TIMEOUT_S,
        breaker=CircuitBreaker(failures=3, interval_s=0.5),
        max_in_flight=16,
    )
    try:
        assert (await store.hit("k", 10, 60)).allowed
        before = connections_received(redis_server)
        baseline_tasks = tasks()
        redis_server.pause()
        for _ in range(3):
            took, error = await timed(store.hit("k", 10, 60))
            assert isinstance(error, StoreUnavailable) and "no answer within 50 ms" in str(error)
            assert took < lag.bound(TIMEOUT_S + MARGIN_S)
        assert store.guard.breaker.open
        start = time.monotonic()
        results = await asyncio.gather(
            *(store.hit("k", 10, 60) for _ in range(2_000)), return_exceptions=True
        )
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert time.monotonic() - start < 0.5  # 2,000 calls refused without waiting
        await drained(store)
        assert tasks() == baseline_tasks
        await asyncio.sleep(0.5)  # one probe after the interval, which times out too
        took, error = await timed(store.reserve("r", [Charge("b", 5, 1, 0, 2**40)], 60))
        assert isinstance(error, StoreUnavailable) and took < lag.bound(TIMEOUT_S + MARGIN_S)
        took, error = await timed(store.hit("k", 10, 60))
        assert isinstance(error, StoreUnavailable) and took < lag.bound(FAST_S)
        redis_server.resume()
        assert await until_ok(store, 3.0) < 2.0
        # at most one connection per call that reached the network: 3 + 1 probe + recovery
        assert connections_received(redis_server) - before <= 8
        assert await admitted_again(store, "r2")
    finally:
        redis_server.resume()
        await store.close()


async def test_redis_paused_under_load_bounds_in_flight_tasks_and_memory(
    redis_server: RedisProcess, lag: Lag
) -> None:
    # a breaker that never opens: the worst case, every admitted call waits for its timeout
    store = RedisStore(
        redis_server.url,
        timeout_s=TIMEOUT_S,
        breaker=CircuitBreaker(failures=10**9, interval_s=1.0),
        max_in_flight=16,
    )
    try:
        await store.hit("k", 10, 60)
        baseline_tasks = tasks()
        redis_server.pause()
        worst = 0.0
        peak = 0

        async def one() -> None:
            nonlocal worst, peak
            peak = max(peak, store.guard.in_flight)
            took, error = await timed(store.hit("k", 10, 60))
            assert isinstance(error, StoreUnavailable)
            worst = max(worst, took)

        async def wave() -> None:
            await asyncio.gather(*(one() for _ in range(200)))

        for _ in range(5):  # warm up: pool, logging, caches
            await wave()
        await drained(store)
        gc.collect()
        tracemalloc.start()
        try:
            first, _ = tracemalloc.get_traced_memory()
            for _ in range(20):
                await wave()
            await drained(store)
            gc.collect()
            last, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert worst < lag.bound(TIMEOUT_S + MARGIN_S)
        assert peak <= 16
        await drained(store)
        assert tasks() == baseline_tasks
        pool: Any = store.redis.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 16
        assert last - first < 256 * 1024, f"limiter memory grew by {last - first} bytes"
        redis_server.resume()
        await until_ok(store, 3.0)
    finally:
        redis_server.resume()
        await store.close()


async def test_redis_killed_fails_fast_and_recovers_after_restart(
    redis_server: RedisProcess, lag: Lag
) -> None:
    store = RedisStore(
        redis_server.url, timeout_s=TIMEOUT_S, breaker=CircuitBreaker(3, interval_s=0.3)
    )
    try:
        await store.reserve("before", [Charge("b", 5, 1, 0, 2**40)], 60)
        redis_server.kill()
        for _ in range(10):
            took, error = await timed(store.hit("k", 10, 60))
            assert isinstance(error, StoreUnavailable) and took < lag.bound(TIMEOUT_S + MARGIN_S)
        assert store.guard.breaker.open
        redis_server.start()  # same port, empty (no persistence): scripts loaded again
        assert await until_ok(store, 3.0) < 2.0
        assert await admitted_again(store, "after")
    finally:
        await store.close()


class SlowStore:
    """A backing store that never answers in time."""

    async def hit(self, key: str, requests: int, per_seconds: int, want: int = 1) -> RateDecision:
        await asyncio.sleep(30)
        raise AssertionError

    async def reserve(
        self, reservation: str, charges: Sequence[Charge], ttl_s: float
    ) -> Reservation:
        await asyncio.sleep(30)
        raise AssertionError

    async def settle(self, reservation: str, actual: Mapping[str, int]) -> None:
        await asyncio.sleep(30)

    async def budgets(self, prefix: str = "") -> list[BudgetState]:
        raise StoreUnavailable("backing redis down")

    async def close(self) -> None:
        pass


async def test_remote_slow_store_is_bounded_and_its_unavailability_passes_through(
    lag: Lag,
) -> None:
    server, address = await serve(SlowStore())
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    store = RemoteStore(channel, timeout_s=TIMEOUT_S, breaker=CircuitBreaker(3, 0.3))
    try:
        with pytest.raises(StoreUnavailable, match="backing redis down"):
            await store.budgets()
        for _ in range(2):
            took, error = await timed(store.hit("k", 1, 1))
            assert isinstance(error, StoreUnavailable) and took < lag.bound(TIMEOUT_S + MARGIN_S)
        assert store.guard.breaker.open
        took, error = await timed(store.reserve("r", [Charge("b", 1, 1, 0, 10)], 1))
        assert isinstance(error, StoreUnavailable) and took < lag.bound(FAST_S)
    finally:
        await channel.close()
        await server.stop(None)


async def test_remote_server_down_fails_fast_and_recovers_when_back(lag: Lag) -> None:
    backing = MemoryStore()
    server, address = await serve(backing)
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    store = RemoteStore(channel, timeout_s=TIMEOUT_S, breaker=CircuitBreaker(3, 0.3))
    try:
        assert (await store.hit("k", 5, 60)).remaining == 4
        await server.stop(None)
        for _ in range(10):
            took, error = await timed(store.hit("k", 5, 60))
            assert isinstance(error, StoreUnavailable) and took < lag.bound(TIMEOUT_S + MARGIN_S)
        assert store.guard.breaker.open
        server, _ = await serve(backing, port=int(address.rsplit(":", 1)[1]))
        assert await until_ok(store, 3.0) < 2.5
        assert (await store.hit("k", 5, 60)).remaining == 3  # the same store behind it
    finally:
        await channel.close()
        await server.stop(None)


async def test_remote_handler_refuses_callers_authorize_rejects() -> None:
    backing = MemoryStore()

    def authorize(metadata: dict[str, str], peer: str) -> None:
        if metadata.get("x-join-token") != "good":
            raise PermissionError("bad join token")

    server, address = await serve(backing, authorize=authorize)
    channel = grpc.aio.insecure_channel(address)
    try:
        bad = RemoteStore(channel, timeout_s=2.0, metadata=[("x-join-token", "bad")])
        with pytest.raises(StoreUnavailable, match="PERMISSION_DENIED: bad join token"):
            await bad.hit("k", 1, 60)
        assert backing.sizes() == (0, 0, 0)
        good = RemoteStore(channel, timeout_s=2.0, metadata=[("x-join-token", "good")])
        assert (await good.hit("k", 1, 60)).allowed
        raw = channel.unary_unary(
            "/meshgate.limits.v1.LimitStore/Reserve",
            request_serializer=None,
            response_deserializer=None,
        )
        for body in (b"not json", b'{"id": "r", "t": 1, "c": [["b", "x", 1, 0, 1]]}', b"[]"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(body, metadata=[("x-join-token", "good")], timeout=2.0)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert backing.sizes()[2] == 0
    finally:
        await channel.close()
        await server.stop(None)

"""RedisStore beyond the shared contract: nothing in Redis lives forever, scripts survive a
SCRIPT FLUSH, the URL and password file, and prefixes that do not see each other."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from pacing_redis import RedisProcess

from meshgate.pacing.redis_store import RedisStore
from meshgate.pacing.store import Charge, StoreUnavailable

TIMEOUT_S = 5.0  # semantics here, not latency


def keys(server: RedisProcess, prefix: str) -> dict[str, int]:
    """Each key under `prefix` with its TTL in ms (-1: none)."""
    with redis.Redis(port=server.port) as admin:
        return {k.decode(): admin.pttl(k) for k in admin.scan_iter(f"{prefix}*")}


async def test_every_key_expires(shared_redis: RedisProcess) -> None:
    store = RedisStore(shared_redis.url, timeout_s=TIMEOUT_S, prefix="ttl:", window_margin_s=60)
    try:
        now = int(time.time())
        window = (now - 10, now + 3600)
        await store.hit("bucket", 10, 60)
        await store.reserve("held", [Charge("b", 10, 4, *window)], 30)
        await store.reserve("refused", [Charge("b", 10, 7, *window)], 30)
        await store.reserve("settled", [Charge("c", 10, 1, *window)], 30)
        await store.settle("settled", {"c": 1})
        found = keys(shared_redis, "ttl:")
        assert set(found) == {
            "ttl:b:bucket",
            f"ttl:w:{window[0]}:b",
            f"ttl:w:{window[0]}:c",
            "ttl:r:held",
            "ttl:r:refused",
            "ttl:r:settled",
            "ttl:exp",
            "ttl:idx",
        }
        assert all(ttl > 0 for ttl in found.values()), found
        assert found["ttl:b:bucket"] <= 7_000  # full again in 6 s: then it is not needed
        assert found["ttl:r:refused"] <= 30_000
        assert 3_600_000 < found[f"ttl:w:{window[0]}:b"] <= 3_660_000
    finally:
        await store.close()


async def test_windows_are_dropped_after_their_end_plus_margin(shared_redis: RedisProcess) -> None:
    store = RedisStore(shared_redis.url, timeout_s=TIMEOUT_S, prefix="drop:", window_margin_s=1)
    try:
        now = time.time()
        window = (int(now) - 10, int(now) + 1)
        assert (await store.reserve("r", [Charge("b", 10, 4, *window)], 0.2)).admitted
        assert [s.budget for s in await store.budgets()] == ["b"]
        await asyncio.sleep(window[1] + 1 - time.time() + 1.1)
        assert await store.budgets() == []
        assert keys(shared_redis, "drop:") == {}  # swept, expired, and the indexes went with them
    finally:
        await store.close()


async def test_scripts_are_loaded_again_after_a_flush(shared_redis: RedisProcess) -> None:
    store = RedisStore(shared_redis.url, timeout_s=TIMEOUT_S, prefix="flush:")
    try:
        assert (await store.hit("k", 2, 60)).remaining == 1
        with redis.Redis(port=shared_redis.port) as admin:
            admin.script_flush()
        assert (await store.hit("k", 2, 60)).remaining == 0
        assert (await store.reserve("r", [Charge("b", 1, 1, 0, 2**40)], 60)).admitted
    finally:
        await store.close()


async def test_prefixes_are_separate_stores(shared_redis: RedisProcess) -> None:
    one = RedisStore(shared_redis.url, timeout_s=TIMEOUT_S, prefix="one:")
    two = RedisStore(shared_redis.url, timeout_s=TIMEOUT_S, prefix="two:")
    try:
        assert (await one.hit("k", 1, 60)).allowed
        assert (await two.hit("k", 1, 60)).allowed
        await one.reserve("r", [Charge("b", 1, 1, 0, 2**40)], 60)
        assert (await two.reserve("r", [Charge("b", 1, 1, 0, 2**40)], 60)).admitted
    finally:
        await one.close()
        await two.close()


def test_url_must_be_redis() -> None:
    for url in ("http://localhost:6379", "localhost:6379", "redis://", "unix:///tmp/r.sock"):
        with pytest.raises(ValueError, match="redis://"):
            RedisStore(url)


async def test_password_from_url_or_file(tmp_path: Path) -> None:
    server = RedisProcess()
    server.start("--requirepass", "s3cret")
    stores: list[RedisStore] = []
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        secret = tmp_path / "redis-password"
        secret.write_text("s3cret\n")
        stores.append(RedisStore(url, timeout_s=TIMEOUT_S))
        stores.append(RedisStore(server.url, password_file=secret, timeout_s=TIMEOUT_S))
        for store in stores:
            assert (await store.hit("k", 5, 60)).allowed
        wrong = tmp_path / "wrong"
        wrong.write_text("nope")
        stores.append(RedisStore(server.url, password_file=wrong, timeout_s=TIMEOUT_S))
        with pytest.raises(StoreUnavailable, match=r"(?i)auth|password"):
            await stores[-1].hit("k", 5, 60)
        stores.append(RedisStore(server.url, timeout_s=TIMEOUT_S))
        with pytest.raises(StoreUnavailable, match=r"(?i)auth"):
            await stores[-1].hit("k", 5, 60)
        with pytest.raises(ValueError, match="not both"):
            RedisStore(url, password_file=secret)
    finally:
        for store in stores:
            await store.close()
        server.stop()

"""Limit store fixtures: every contract test runs against MemoryStore, RedisStore (a real
redis-server) and RemoteStore (a real grpc.aio server serving a MemoryStore)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from pacing_redis import redis_server, shared_redis
from store_backends import Backend, serve

from meshgate.pacing.memory_store import MemoryStore

__all__ = ["redis_server", "shared_redis"]


@pytest.fixture(params=["memory", "redis", "remote"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    kind = request.param
    b = Backend(kind)
    if kind == "memory":
        b.memory = MemoryStore()
    elif kind == "redis":
        b.redis = request.getfixturevalue("shared_redis")
        b.prefix = f"t{uuid.uuid4().hex[:12]}:"
    else:
        b.memory = MemoryStore()
        b.server, b.address = await serve(b.memory)
    try:
        yield b
    finally:
        await b.close()

"""The limit stores as the contract tests see them: one store through any number of clients,
and a grpc.aio server serving a store (importable by name: a `conftest` import would find
whichever conftest.py Python loaded first)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from pacing_redis import RedisProcess

from meshgate.pacing.memory_store import MemoryStore
from meshgate.pacing.redis_store import RedisStore
from meshgate.pacing.remote_store import RemoteStore
from meshgate.pacing.store import LimitStore
from meshgate.pacing.store_service import store_service_handler

# generous: these tests check semantics on a loaded 2-core machine, not latency
CONTRACT_TIMEOUT_S = 5.0


@dataclass
class Backend:
    """One store seen through any number of clients (gateways)."""

    kind: str
    memory: MemoryStore | None = None
    redis: RedisProcess | None = None
    prefix: str = ""
    server: grpc.aio.Server | None = None
    address: str = ""
    clients: list[LimitStore] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def client(self, **options: Any) -> LimitStore:
        store: LimitStore
        if self.kind == "memory":
            assert self.memory is not None
            return self.memory
        if self.kind == "redis":
            assert self.redis is not None
            options.setdefault("timeout_s", CONTRACT_TIMEOUT_S)
            options.setdefault("prefix", self.prefix)
            store = RedisStore(self.redis.url, **options)
        else:
            channel = grpc.aio.insecure_channel(self.address)
            self.channels.append(channel)
            options.setdefault("timeout_s", CONTRACT_TIMEOUT_S)
            store = RemoteStore(channel, **options)
        self.clients.append(store)
        return store

    async def close(self) -> None:
        for store in self.clients:
            await store.close()
        for channel in self.channels:
            await channel.close()
        if self.server is not None:
            await self.server.stop(None)


async def serve(store: LimitStore, port: int = 0, **options: Any) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((store_service_handler(store, **options),))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{port}"

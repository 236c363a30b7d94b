"""Shared fixture builders: policy models in code, free ports, an ADS server on loopback."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from meshgate.controlplane.ads import SERVER_OPTIONS, AdsService
from meshgate.controlplane.cache import SnapshotCache
from meshgate.controlplane.registry import NodeRegistry
from meshgate.policy.model import AgentPolicy, Destination, EgressRule, Mesh, PolicyModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model(
    version: str = "v1",
    destinations: tuple[Destination, ...] | None = None,
    listen_port: int = 15001,
    agents: tuple[AgentPolicy, ...] = (),
) -> PolicyModel:
    if destinations is None:
        destinations = (
            Destination("alpha", "alpha.internal", 80, tls="none", address=("127.0.0.1", 9001)),
            Destination("beta", "beta.internal", 80, tls="none", address=("127.0.0.1", 9002)),
        )
    if not agents:
        agents = (AgentPolicy("researcher", "researcher", (EgressRule(destinations[0].name),)),)
    return PolicyModel(Mesh(gateway_listen_port=listen_port), destinations, agents, version)


@dataclass
class AdsHarness:
    cache: SnapshotCache
    registry: NodeRegistry
    address: str


@asynccontextmanager
async def ads_server() -> AsyncIterator[AdsHarness]:
    cache = SnapshotCache()
    registry = NodeRegistry()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((AdsService(cache, registry).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield AdsHarness(cache, registry, f"127.0.0.1:{port}")
    finally:
        await server.stop(grace=0)


class AdsClient:
    """A scripted ADS client over a real gRPC stream: send requests, await responses."""

    def __init__(
        self, address: str, delta: bool = False, metadata: tuple[tuple[str, str], ...] = ()
    ):
        import asyncio

        from envoy.service.discovery.v3 import ads_pb2_grpc

        self._asyncio = asyncio
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.outbox: asyncio.Queue[object] = asyncio.Queue()
        method = (
            self.stub.DeltaAggregatedResources if delta else self.stub.StreamAggregatedResources
        )
        self.call = method(self._requests(), metadata=metadata or None)
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.inbox.put_nowait(response)
        except BaseException as exc:  # surfaced to the test by recv()
            self.inbox.put_nowait(exc)

    async def _requests(self):  # type: ignore[no-untyped-def]
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            yield item

    def send(self, request: object) -> None:
        self.outbox.put_nowait(request)

    async def recv(self, timeout: float = 5.0):  # type: ignore[no-untyped-def]
        got = await self._asyncio.wait_for(self.inbox.get(), timeout)
        if isinstance(got, BaseException):
            raise got
        return got

    async def expect_silence(self, seconds: float = 0.3) -> None:
        try:
            got = await self._asyncio.wait_for(self.inbox.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no response, got {got}")

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        self.call.cancel()
        self._reader.cancel()
        await self.channel.close()

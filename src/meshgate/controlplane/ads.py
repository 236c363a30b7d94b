"""The AggregatedDiscoveryService over grpc.aio, with raw-bytes responses.

Responses are pre-serialised by the snapshot, so the handler's serializer passes bytes through.
One `Pusher` per service bounds how many streams push a snapshot change at once.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from meshgate.controlplane.cache import SnapshotCache
from meshgate.controlplane.push_queue import Pusher
from meshgate.controlplane.registry import NodeRegistry
from meshgate.controlplane.streams import (
    PUSH_SLOT_TIMEOUT,
    AdsStream,
    Authenticator,
    DeltaStream,
    SotwStream,
    StreamError,
    allow_all,
)

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

# gRPC core cancels new calls once 1,000 are waiting to be picked up by the (one-at-a-time)
# Python accept loop; a fleet of Envoys reconnecting after a restart exceeds that at once.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.max_pings_without_data", 0),
    # no bandwidth-probe ping after every ACK (a fifth of a mesh-wide push's server CPU); a
    # fixed 1 MiB stream window instead, so access logs over a long link are not held to the
    # 64 KiB default that BDP would otherwise have grown
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1 << 20),
]


# Streams pushing a snapshot change at once. Each push hands at most one response per type to
# gRPC, so this bounds the responses being serialised and buffered, not who gets them.
MAX_CONCURRENT_PUSHES = 100


def _passthrough(data: bytes) -> bytes:
    return data


class AdsService:
    def __init__(
        self,
        cache: SnapshotCache,
        registry: NodeRegistry,
        authenticate: Authenticator = allow_all,
        max_concurrent_pushes: int = MAX_CONCURRENT_PUSHES,
    ) -> None:
        self.cache = cache
        self.registry = registry
        self.authenticate = authenticate
        self.pusher: Pusher[AdsStream] = Pusher(
            AdsStream.push, max_concurrent_pushes, slot_timeout=PUSH_SLOT_TIMEOUT
        )
        self.sent: collections.Counter[str] = collections.Counter()  # responses, by type URL

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_sotw,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=_passthrough,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_delta,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=_passthrough,
                ),
            },
        )

    async def stream_sotw(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._serve(SotwStream, requests, context)

    async def stream_delta(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._serve(DeltaStream, requests, context)

    async def _serve(
        self, kind: type[AdsStream], requests: AsyncIterator[Any], context: Any
    ) -> None:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        stream = kind(
            self.cache,
            self.registry,
            context.write,
            context.peer(),
            metadata,
            self.authenticate,
            self.pusher,
            self.sent,
        )
        try:
            await stream.run(context.read)  # not `requests`: see AdsStream._read
        except StreamError as exc:
            log.info("stream %s closed: %s", stream.stream_id, exc.message)
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)

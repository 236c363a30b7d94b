"""Envoy's gRPC AccessLogService on the xDS port: access-log entries in, audit records stored.

`StreamAccessLogs` is client-streaming: the response is sent only when the client half-closes,
and only after every record of the stream is committed to the store. The gateway's spool shipper
relies on that: one stream per batch, and it advances its checkpoint only on the response. A
long-lived stream (Envoy's own gRPC logger) is committed every `flush_interval` meanwhile.

Streams are authenticated like xDS: the first message names the node, and with join tokens
required the token must name that node. A gateway may log for any agent; a sidecar
(`agent/<name>/...`) only for its own agent, so no node can forge another's records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from envoy.service.accesslog.v3 import als_pb2

from meshgate.audit.ingest import IngestError, record_from_entry
from meshgate.audit.record import AuditRecord
from meshgate.audit.store import AuditStore
from meshgate.controlplane.streams import Authenticator, StreamError, allow_all
from meshgate.xds.nodes import NodeRole, parse_node_id

log = logging.getLogger(__name__)

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
METHOD = f"/{SERVICE}/StreamAccessLogs"

T = TypeVar("T")


class AuditWriter:
    """The one thread that touches the store: SQLite connections stay on their thread, and
    appends never block the event loop."""

    def __init__(self, opener: Callable[[], AuditStore]) -> None:
        self._opener = opener
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-store")
        self.store: AuditStore | None = None

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def open(self) -> AuditStore:
        self.store = await self._run(self._opener)
        return self.store

    async def append(self, records: Sequence[AuditRecord]) -> int:
        store = self.store
        assert store is not None, "AuditWriter.open() first"
        return await self._run(lambda: store.append(records))

    async def close(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            await self._run(store.close)
        self._executor.shutdown(wait=False)


class AccessLogService:
    def __init__(
        self,
        writer: AuditWriter,
        authenticate: Authenticator = allow_all,
        flush_interval: float = 0.5,
        batch_size: int = 2000,  # per commit: the unique request-id index makes small ones dear
        on_commit: Callable[[int, int], None] | None = None,
    ) -> None:
        self.writer = writer
        self.authenticate = authenticate
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.on_commit = on_commit  # (records received, records new) per commit, for metrics

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
                    self.stream_access_logs,
                    request_deserializer=als_pb2.StreamAccessLogsMessage.FromString,
                    response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
                )
            },
        )

    async def stream_access_logs(
        self, requests: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        stream = _Stream(self, metadata, context.peer())
        try:
            await stream.run(requests)
        except StreamError as exc:
            log.info("access-log stream from %s refused: %s", stream.node_id or "?", exc.message)
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
        return als_pb2.StreamAccessLogsResponse()


class _Stream:
    def __init__(self, service: AccessLogService, metadata: dict[str, str], peer: str) -> None:
        self.service = service
        self.metadata = metadata
        self.peer = peer
        self.node_id = ""
        self.role: NodeRole | None = None
        self.pending: list[AuditRecord] = []
        self.lock = asyncio.Lock()  # one commit at a time per stream, in order
        self.failure: StreamError | None = None
        self.ended = asyncio.Event()  # the client half-closed: the flusher stops between commits

    async def run(self, requests: AsyncIterator[als_pb2.StreamAccessLogsMessage]) -> None:
        flusher: asyncio.Task[None] | None = None
        try:
            async for message in requests:
                if self.failure is not None:
                    raise self.failure
                if self.role is None:
                    self._connect(message)
                    flusher = asyncio.create_task(self._flush_periodically())
                elif message.identifier.node.id not in ("", self.node_id):
                    raise StreamError("INVALID_ARGUMENT", "one node per access-log stream")
                self._take(message)
                if len(self.pending) >= self.service.batch_size:
                    await self._commit()
        finally:
            # never cancel a commit in flight: its batch has left `pending`, and an OK answer
            # would move the client's checkpoint past records that were not stored
            self.ended.set()
            if flusher is not None:
                await flusher
        await self._commit()
        if self.failure is not None:
            raise self.failure

    def _connect(self, message: als_pb2.StreamAccessLogsMessage) -> None:
        node_id = message.identifier.node.id
        if not node_id:
            raise StreamError("INVALID_ARGUMENT", "the first message must carry identifier.node.id")
        try:
            role = parse_node_id(node_id)
        except ValueError as exc:
            raise StreamError("INVALID_ARGUMENT", str(exc)) from None
        self.service.authenticate(node_id, self.metadata, self.peer)
        self.node_id, self.role = node_id, role

    def _take(self, message: als_pb2.StreamAccessLogsMessage) -> None:
        assert self.role is not None
        if message.HasField("tcp_logs") and message.tcp_logs.log_entry:
            raise StreamError("INVALID_ARGUMENT", "only HTTP access logs are accepted")
        for entry in message.http_logs.log_entry:
            try:
                record = record_from_entry(entry, self.node_id)
            except (IngestError, ValueError, OverflowError) as exc:
                raise StreamError("INVALID_ARGUMENT", f"bad access-log entry: {exc}") from None
            if self.role.kind == "agent":
                if record.agent and record.agent != self.role.name:
                    raise StreamError(
                        "PERMISSION_DENIED",
                        f"{self.node_id} may log only for agent {self.role.name},"
                        f" not {record.agent}",
                    )
                # a sidecar vouches for nothing but its own refusals
                record = replace(record, agent=self.role.name, spiffe_id="")
            self.pending.append(record)

    async def _flush_periodically(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), self.service.flush_interval)
            if self.ended.is_set():
                return
            try:
                await self._commit()
            except StreamError as exc:
                self.failure = exc
                return

    async def _commit(self) -> None:
        async with self.lock:
            batch, self.pending = self.pending, []
            if not batch:
                return
            try:
                new = await self.service.writer.append(batch)
            except Exception as exc:  # the client keeps its spool and sends again
                log.exception("storing %d audit records from %s failed", len(batch), self.node_id)
                raise StreamError("UNAVAILABLE", f"audit store failed: {exc}") from None
            if self.service.on_commit is not None:
                self.service.on_commit(len(batch), new)

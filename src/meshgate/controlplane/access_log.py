"""Envoy's gRPC AccessLogService on the xDS port: access-log entries in, audit records stored.

The handler runs on the xDS event loop but does no audit work there: it hands each message's
raw bytes to `AuditIngest`, a thread with its own event loop that authenticates the stream,
has a worker process decode and check each message (`Decoder`: records as their stored values
and chain digests; the decoding would otherwise hold this process's GIL half the time) and
commits them through `AuditWriter` (the store's own thread). The handler only awaits room in
the hand-over queue and, at the end, the commit. So ingest at any rate costs the xDS loop a
queue hop per message (up to 200 entries), never the decoding or a write.

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
import collections
import contextlib
import logging
import marshal
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

from meshgate.audit.chain import from_micros
from meshgate.audit.decode_worker import HEADER, frame, from_answer
from meshgate.audit.messages import Decoded, Refusal, decode_message
from meshgate.audit.record import AuditRecord
from meshgate.audit.shadow import ShadowDecisions
from meshgate.audit.store import AuditStore, ValuesStore
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

    async def append(self, values: Sequence[tuple[Any, ...]], digests: Sequence[bytes]) -> int:
        """Store records given as their `chain.record_values` and digests (as decoded)."""
        store = self.store
        assert store is not None, "AuditWriter.open() first"
        if isinstance(store, ValuesStore):
            return await self._run(lambda: store.append_values(values, digests))
        records = [AuditRecord.trusted(from_micros(v[0]), v) for v in values]
        return await self._run(lambda: store.append(records))

    async def close(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            await self._run(store.close)
        self._executor.shutdown(wait=False)


class _Worker:
    """One decode worker process (`audit/decode_worker.py`) and the answers it owes, in order."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.owed: collections.deque[asyncio.Future[Decoded | Refusal]] = collections.deque()
        self.alive = True
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls) -> _Worker:
        # -P: the control plane's working directory is not a place to import modules from
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",
            "-m",
            "meshgate.audit.decode_worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        return cls(proc)

    async def decode(self, raw: bytes, node_id: str, agent: str | None) -> asyncio.Future[Any]:
        """Send a message; the future is its answer."""
        stdin = self.proc.stdin
        assert stdin is not None
        owed = asyncio.get_running_loop().create_future()
        self.owed.append(owed)
        stdin.write(frame((raw, node_id, agent)))
        with contextlib.suppress(ConnectionError):  # the reader sees the end and fails `owed`
            await stdin.drain()
        return owed

    async def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            while True:
                (size,) = HEADER.unpack(await stdout.readexactly(HEADER.size))
                result = from_answer(marshal.loads(await stdout.readexactly(size)))
                owed = self.owed.popleft()
                if not owed.done():  # (cancelled: its stream ended)
                    owed.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError):
            if self.alive:  # not stopped by us
                log.error("the audit decode worker (pid %d) exited", self.proc.pid)
        except Exception:  # a garbled answer, or one nobody asked for: never trust it again
            log.exception("the audit decode worker (pid %d) misbehaved", self.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        finally:
            self.alive = False
            while self.owed:
                owed = self.owed.popleft()
                if not owed.done():
                    owed.set_exception(
                        StreamError("UNAVAILABLE", "the audit decoder failed; send again")
                    )

    async def stop(self) -> None:
        self.alive = False
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the worker exits at the end of its input
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


class Decoder:
    """Where messages become records: worker processes (`processes`, default one), so decoding
    uses another core and the control plane's GIL only for the append; with `processes=0`, on
    the ingest thread itself. Runs on the ingest loop. A worker that dies fails the messages it
    had (their streams get UNAVAILABLE: the clients send again) and is replaced."""

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self._workers: list[_Worker | None] = [None] * processes
        self._next = 0
        self._replacing = asyncio.Lock()  # one replacement for a dead worker, not one a stream

    async def start(self) -> None:
        for i in range(self.processes):
            self._workers[i] = await _Worker.start()

    async def stop(self) -> None:
        workers, self._workers = self._workers, [None] * self.processes
        for worker in workers:
            if worker is not None:
                await worker.stop()

    async def submit(self, raw: bytes, node_id: str, agent: str | None) -> asyncio.Future[Decoded]:
        """Decode `raw` (a message of the stream from `node_id`); the result raises
        StreamError for a refused message. Await the results in the order submitted: each
        stream's records are stored in the order it sent them."""
        if not self.processes:
            done: asyncio.Future[Decoded] = asyncio.get_running_loop().create_future()
            try:
                done.set_result(_decoded(decode_message(raw, node_id, agent)))
            except StreamError as exc:
                done.set_exception(exc)
            return done
        i = self._next = (self._next + 1) % self.processes
        worker = self._workers[i]
        if worker is None or not worker.alive:
            worker = await self._replace(i)
        owed = await worker.decode(raw, node_id, agent)
        return asyncio.ensure_future(_answer(owed))

    async def _replace(self, i: int) -> _Worker:
        async with self._replacing:
            worker = self._workers[i]
            if worker is None or not worker.alive:
                if worker is not None:
                    await worker.stop()
                try:
                    worker = self._workers[i] = await _Worker.start()
                except OSError as exc:
                    log.error("cannot start an audit decode worker: %s", exc)
                    raise StreamError("UNAVAILABLE", "the audit decoder is not running") from None
                log.info("started audit decode worker %d (pid %d)", i, worker.proc.pid)
            return worker


async def _answer(owed: asyncio.Future[Decoded | Refusal]) -> Decoded:
    return _decoded(await owed)


def _decoded(result: Decoded | Refusal) -> Decoded:
    if isinstance(result, Refusal):
        raise StreamError(result.code, result.message)
    return result


QUEUE_MESSAGES = 32  # per stream: raw messages handed over but not yet decoded
DECODING = 8  # per stream: messages being decoded by the workers at once (in order)
# Records per commit: a shipper's stream (1 MiB of spool lines, ~2,200 entries) is one commit,
# not two (a second, small transaction paid the fsync and the chain link for ~200 records).
BATCH_SIZE = 5000


class AuditIngest:
    """The audit side of the xDS port: its own thread and event loop, its own store thread."""

    def __init__(
        self,
        writer: AuditWriter,
        authenticate: Authenticator = allow_all,
        flush_interval: float = 0.5,
        batch_size: int = BATCH_SIZE,
        on_commit: Callable[[int, int], None] | None = None,
        decoder: Decoder | None = None,
        shadow: ShadowDecisions | None = None,
    ) -> None:
        """`shadow`: sets would-be decisions of the policy's shadow rules on records."""
        self.writer = writer
        self.shadow = shadow
        self.decoder = decoder if decoder is not None else Decoder()
        self.authenticate = authenticate
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.on_commit = on_commit  # (records received, records new) per commit, for metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Open the store (its errors stop the start), then start the ingest thread."""
        try:
            await self.writer.open()
        except BaseException:
            await self.writer.close()
            raise
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="audit-ingest", daemon=True)
        self._thread.start()
        self._loop = loop
        try:
            await asyncio.wrap_future(self._submit(self.decoder.start()))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None and thread is not None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_cancel_all(), loop))
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.decoder.stop(), loop))
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join)
            loop.close()
        await self.writer.close()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self._loop is None:
            coro.close()
            raise StreamError("UNAVAILABLE", "the audit ingest is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
                    self.stream_access_logs,
                    request_deserializer=None,  # raw bytes: decoding happens on the ingest thread
                    response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
                )
            },
        )

    async def _hand_over(
        self, inbox: asyncio.Queue[bytes | None], raw: bytes | None, done: asyncio.Future[None]
    ) -> bool:
        """Queue `raw` on the ingest loop, waiting for room; False if the stream ended first
        (refused or failed: nothing more of it is read)."""
        if done.done():
            return False
        put = asyncio.wrap_future(self._submit(inbox.put(raw)))
        await asyncio.wait((put, done), return_when=asyncio.FIRST_COMPLETED)
        if put.done() and not done.done():
            return True
        put.cancel()
        return False

    async def stream_access_logs(
        self, requests: AsyncIterator[bytes], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        """On the xDS loop: move raw messages to the ingest loop, answer once committed."""
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        stream = _Stream(self, metadata, context.peer())
        try:
            inbox = await asyncio.wrap_future(self._submit(_new_queue()))
            done = asyncio.wrap_future(self._submit(stream.run(_drain(inbox))))
            handed_over = False
            try:
                async for raw in requests:
                    if not await self._hand_over(inbox, raw, done):
                        break  # refused or failed: stop reading
                else:  # the client half-closed: commit everything, then answer
                    handed_over = await self._hand_over(inbox, None, done)
            finally:
                if not handed_over and self._loop is not None:  # no OK answer will be sent
                    self._loop.call_soon_threadsafe(_end_abruptly, inbox)
            await done
        except StreamError as exc:
            log.info("access-log stream from %s refused: %s", stream.node_id or "?", exc.message)
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
        return als_pb2.StreamAccessLogsResponse()


async def _new_queue() -> asyncio.Queue[bytes | None]:
    return asyncio.Queue(QUEUE_MESSAGES)  # created on the ingest loop, which owns it


def _end_abruptly(inbox: asyncio.Queue[bytes | None]) -> None:
    """The stream ends without an OK answer (the client left, or it was refused): what is
    still queued may be dropped, the client keeps its spool and sends it again."""
    while inbox.full():
        inbox.get_nowait()
    inbox.put_nowait(None)


async def _drain(inbox: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (raw := await inbox.get()) is not None:
        yield raw


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _Stream:
    """One access-log stream, entirely on the ingest loop."""

    def __init__(self, service: AuditIngest, metadata: dict[str, str], peer: str) -> None:
        self.service = service
        self.metadata = metadata
        self.peer = peer
        self.node_id = ""
        self.role: NodeRole | None = None
        self.agent: str | None = None  # a sidecar's agent: the only one it may log for
        self.identity = ""  # what the authenticator verified
        self._still_valid: Callable[[str, dict[str, str]], None] | None = None
        self.values: list[tuple[Any, ...]] = []  # decoded, not yet committed
        self.digests: list[bytes] = []
        self.lock = asyncio.Lock()  # one commit at a time per stream, in order
        self.failure: StreamError | None = None
        self.ended = asyncio.Event()  # the client half-closed: the flusher stops between commits

    async def run(self, requests: AsyncIterator[bytes]) -> None:
        flusher: asyncio.Task[None] | None = None
        decoding: collections.deque[asyncio.Future[Decoded]] = collections.deque()
        try:
            async for raw in requests:
                if self.failure is not None:
                    raise self.failure
                if self.role is None:  # who is logging, before any entry is decoded
                    self._connect(_decode(raw))
                    flusher = asyncio.create_task(self._flush_periodically())
                elif self._still_valid is not None:  # a sub-agent's: still its delegation's?
                    self._still_valid(self.identity, self.metadata)
                decoding.append(await self.service.decoder.submit(raw, self.node_id, self.agent))
                while decoding and (len(decoding) > DECODING or decoding[0].done()):
                    await self._take(decoding.popleft())
            while decoding:
                await self._take(decoding.popleft())
        finally:
            for pending in decoding:  # the stream failed: nothing after it is stored
                if not pending.cancel():
                    pending.exception()  # done already: its refusal is not news
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
        self.identity = self.service.authenticate(node_id, self.metadata, self.peer)
        self.node_id, self.role = node_id, role
        self.agent = role.name if role.kind == "agent" else None
        if self.agent is not None and "." in self.agent:
            # a sub-agent's sidecar: before each message, as xDS streams do before each
            # response, the authenticator's optional check (no I/O) that the token is still its
            # current delegation's (deleted, the old holder's stream logs nothing more)
            self._still_valid = getattr(self.service.authenticate, "recheck", None)

    async def _take(self, decoding: asyncio.Future[Decoded]) -> None:
        """The next message's records, in the order the client sent them."""
        values, digests = await decoding
        if self.service.shadow is not None:
            await self.service.shadow.annotate(values, digests)
        self.values += values
        self.digests += digests
        if len(self.values) >= self.service.batch_size:
            await self._commit()

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
            values, digests = self.values, self.digests
            self.values, self.digests = [], []
            if not values:
                return
            try:
                new = await self.service.writer.append(values, digests)
            except Exception as exc:  # the client keeps its spool and sends again
                log.exception("storing %d audit records from %s failed", len(values), self.node_id)
                raise StreamError("UNAVAILABLE", f"audit store failed: {exc}") from None
            if self.service.on_commit is not None:
                self.service.on_commit(len(values), new)


def _decode(raw: bytes) -> als_pb2.StreamAccessLogsMessage:
    try:
        return als_pb2.StreamAccessLogsMessage.FromString(raw)
    except DecodeError:
        raise StreamError("INVALID_ARGUMENT", "undecodable access-log message") from None

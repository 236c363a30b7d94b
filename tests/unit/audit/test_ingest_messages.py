"""Messages decoded where the control plane decodes them (a worker process): the same records
as the plain mapping, the same refusals, the same chain; order and acknowledgements kept, and a
dead worker costs a retry, never a record."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from audit_fixtures import make_records
from envoy.data.accesslog.v3 import accesslog_pb2 as als
from envoy.service.accesslog.v3 import als_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ingest import entries, line, plain_record

from meshgate.audit.chain import digest, record_values, values_digest
from meshgate.audit.ingest import entry_from_spool
from meshgate.audit.messages import Refusal, decode_message
from meshgate.audit.spool import METHOD
from meshgate.audit.sqlbase import SqlAuditStore
from meshgate.audit.sqlite_store import SqliteAuditStore
from meshgate.controlplane.access_log import DECODING, AuditIngest, AuditWriter, Decoder


def message(entries: list[als.HTTPAccessLogEntry], node: str = "gateway/g1") -> bytes:
    m = als_pb2.StreamAccessLogsMessage()
    m.identifier.node.id = node
    m.http_logs.log_entry.extend(entries)
    return m.SerializeToString()


@settings(max_examples=150, deadline=None)
@given(st.lists(entries(), max_size=4))
def test_a_message_decodes_to_the_plain_records_values_and_digests(
    batch: list[als.HTTPAccessLogEntry],
) -> None:
    decoded = decode_message(message(batch), "gateway/g1", None)
    try:
        plain = [plain_record(e, "gateway/g1") for e in batch]
    except (ValueError, OverflowError):
        assert isinstance(decoded, Refusal) and decoded.code == "INVALID_ARGUMENT"
        assert decoded.message.startswith("bad access-log entry: ")
        return
    assert decoded == ([record_values(r) for r in plain], [digest(r) for r in plain])


def test_a_sidecar_logs_only_for_its_agent_and_vouches_for_no_identity() -> None:
    own = entry_from_spool(line(agent="coder", route=None, spiffe_id="spiffe://td/agent/coder"))
    unnamed = entry_from_spool(line(agent=None, route=None))
    decoded = decode_message(message([own, unnamed], "agent/coder/1"), "agent/coder/1", "coder")
    assert not isinstance(decoded, Refusal)
    values, digests = decoded
    assert [(v[2], v[3], v[15]) for v in values] == [("coder", "", "agent/coder/1")] * 2
    assert digests == [values_digest(v) for v in values]
    other = entry_from_spool(line(agent="researcher", route=None))
    assert decode_message(message([own, other], ""), "agent/coder/1", "coder") == Refusal(
        "PERMISSION_DENIED", "agent/coder/1 may log only for agent coder, not researcher"
    )


def test_what_ends_a_stream() -> None:
    entry = entry_from_spool(line())
    assert decode_message(b"\xff\xff\xff", "gateway/g1", None) == Refusal(
        "INVALID_ARGUMENT", "undecodable access-log message"
    )
    assert decode_message(message([entry], "gateway/g2"), "gateway/g1", None) == Refusal(
        "INVALID_ARGUMENT", "one node per access-log stream"
    )
    tcp = als_pb2.StreamAccessLogsMessage()
    tcp.tcp_logs.log_entry.add()
    assert decode_message(tcp.SerializeToString(), "gateway/g1", None) == Refusal(
        "INVALID_ARGUMENT", "only HTTP access logs are accepted"
    )
    # later messages of a stream may leave the node out
    assert not isinstance(decode_message(message([entry], ""), "gateway/g1", None), Refusal)


def test_values_with_their_digests_store_what_records_would(tmp_path: Path) -> None:
    by_records, by_values = (SqliteAuditStore(tmp_path / f"{n}.db") for n in ("r", "v"))
    try:
        records = make_records(30)
        values = [record_values(r) for r in records]
        digests = [values_digest(v) for v in values]
        for store in (by_records, by_values):
            store.append(records[:10])
        # a resend of stored records and a repeat within the batch are skipped the same way
        batch = [*range(5, 30), 12, 20]
        assert by_records.append([records[i] for i in batch]) == 20
        assert (
            by_values.append_values([values[i] for i in batch], [digests[i] for i in batch]) == 20
        )
        assert [r for _, r in by_values.tail(0)] == [r for _, r in by_records.tail(0)]
        report = by_values.verify()
        assert report.ok and report.head_hash == by_records.verify().head_hash
        with pytest.raises(ValueError, match="2 records but 1 digests"):
            by_values.append_values(values[:2], digests[:1])
    finally:
        by_records.close()
        by_values.close()


def spool_entry(i: int) -> als.HTTPAccessLogEntry:
    return entry_from_spool(line(request_id=f"req-{i:05d}", start=f"{1795619752 + i}.000001"))


async def serve(store: SqlAuditStore, **kwargs: Any) -> tuple[AuditIngest, grpc.aio.Server, str]:
    ingest = AuditIngest(AuditWriter(lambda: store), **kwargs)
    await ingest.start()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ingest.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return ingest, server, f"127.0.0.1:{port}"


async def test_streams_decoded_in_workers_are_stored_in_the_order_sent(tmp_path: Path) -> None:
    """More messages than are decoded at once, from two nodes at the same time: each node's
    records get ids in the order it sent them, and the chain verifies."""
    store = SqliteAuditStore(tmp_path / "audit.db")
    ingest, server, address = await serve(store, decoder=Decoder(processes=2))
    per_message, messages = 7, 3 * DECODING
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.stream_unary(METHOD, request_serializer=lambda raw: raw)

            async def ship(node: str, offset: int) -> None:
                stream = [
                    message(
                        [spool_entry(offset + m * per_message + i) for i in range(per_message)],
                        node,
                    )
                    for m in range(messages)
                ]
                await call(iter(stream), timeout=60)

            await asyncio.gather(ship("gateway/g1", 0), ship("gateway/g2", 10_000))
        stored = [r for _, r in store.tail(0, 10_000)]
        for node, offset in (("gateway/g1", 0), ("gateway/g2", 10_000)):
            ids = [r.request_id for r in stored if r.gateway == node]
            assert ids == [f"req-{offset + i:05d}" for i in range(per_message * messages)]
        assert store.verify().ok
    finally:
        await server.stop(grace=0)
        await ingest.stop()


async def until(check: Any, what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_dead_decoder_is_replaced_and_only_what_it_owed_is_sent_again(
    tmp_path: Path,
) -> None:
    store = SqliteAuditStore(tmp_path / "audit.db")
    ingest, server, address = await serve(store)
    stream = [message([spool_entry(i)]) for i in range(3)]
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.stream_unary(METHOD, request_serializer=lambda raw: raw)
            await call(iter(stream[:1]), timeout=30)
            # a worker that died between streams is replaced before the next message
            (idle,) = ingest.decoder._workers
            assert idle is not None
            os.kill(idle.proc.pid, signal.SIGKILL)
            await until(lambda: not idle.alive, "the ingest loop to see the worker go")
            await call(iter(stream[:2]), timeout=30)
            # one that dies owing answers fails their stream, which the client sends again
            (busy,) = ingest.decoder._workers
            assert busy is not None and busy is not idle
            os.kill(busy.proc.pid, signal.SIGSTOP)
            answer = asyncio.ensure_future(call(iter(stream), timeout=30))
            await until(lambda: len(busy.owed) == 3, "three messages owed")
            os.kill(busy.proc.pid, signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await answer
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            await call(iter(stream), timeout=30)
        assert [r.request_id for _, r in store.tail(0)] == ["req-00000", "req-00001", "req-00002"]
        assert store.verify().ok
    finally:
        await server.stop(grace=0)
        await ingest.stop()


async def test_streams_are_unavailable_while_no_decode_worker_can_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteAuditStore(tmp_path / "audit.db")
    ingest, server, address = await serve(store)
    stream = [message([spool_entry(1)])]
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.stream_unary(METHOD, request_serializer=lambda raw: raw)
            (worker,) = ingest.decoder._workers
            assert worker is not None
            monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
            os.kill(worker.proc.pid, signal.SIGKILL)
            await until(lambda: not worker.alive, "the ingest loop to see the worker go")
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call(iter(stream), timeout=30)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert failed.value.details() == "the audit decoder is not running"
            monkeypatch.undo()
            await call(iter(stream), timeout=30)
        assert [r.request_id for _, r in store.tail(0)] == ["req-00001"]
    finally:
        await server.stop(grace=0)
        await ingest.stop()

"""The AccessLogService and the spool shipper over real gRPC, with an in-memory store.

What must hold: a batch is acknowledged only once stored; the checkpoint only moves on an
acknowledgement; resends are harmless; rotation and truncation lose nothing; only the node a
join token names may log, and a sidecar only for its own agent.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from builders import free_port
from envoy.service.accesslog.v3 import als_pb2

from meshgate.audit.ingest import entry_from_spool
from meshgate.audit.record import AuditRecord
from meshgate.audit.spool import METHOD, SpoolShipper, read_checkpoint
from meshgate.audit.store import AuditPage, AuditQuery
from meshgate.controlplane.access_log import AuditIngest, AuditWriter
from meshgate.controlplane.auth import TokenAuthenticator
from meshgate.controlplane.streams import Authenticator, allow_all
from meshgate.identity.tokens import TokenAuthority
from meshgate.sidecar.envoy_admin import EnvoyAdmin


class MemoryStore:
    """The AuditStore contract: durable on return, duplicates by request_id skipped."""

    def __init__(self) -> None:
        self.records: dict[str, AuditRecord] = {}
        self.fail = False
        self.appends = 0

    def append(self, records: Sequence[AuditRecord]) -> int:
        if self.fail:
            raise RuntimeError("disk full")
        self.appends += 1
        new = 0
        for r in records:
            if r.request_id not in self.records:
                self.records[r.request_id] = r
                new += 1
        return new

    def query(self, query: AuditQuery) -> AuditPage:
        return AuditPage(list(self.records.values())[: query.limit], None)

    def close(self) -> None:
        pass


def spool_line(i: int, agent: str = "researcher") -> str:
    return json.dumps(
        {
            "start": f"{1795619752 + i}.000001",
            "request_id": f"req-{i:05d}",
            "agent": agent,
            "route": f"allow/{agent}/search/0/0",
            "policy_version": "v1",
            "authority": "search.internal",
            "method": "GET",
            "path": f"/r/{i}",
            "status": 200,
            "flags": "-",
            "bytes_received": 0,
            "bytes_sent": 10,
            "duration_us": 100,
        }
    )


def append(spool: Path, lines: range | list[int], agent: str = "researcher") -> None:
    with open(spool, "a") as fh:
        for i in lines:
            fh.write(spool_line(i, agent) + "\n")


@asynccontextmanager
async def als_server(
    store: MemoryStore, authenticate: Authenticator = allow_all, port: int = 0
) -> AsyncIterator[str]:
    ingest = AuditIngest(AuditWriter(lambda: store), authenticate)
    await ingest.start()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ingest.handler(),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{bound}"
    finally:
        await server.stop(grace=0)
        await ingest.stop()


async def ship_all(shipper: SpoolShipper) -> None:
    while await shipper.ship_once() is not None:
        pass


async def test_batches_are_acknowledged_after_storing_and_the_checkpoint_follows(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    spool = tmp_path / "audit-spool.jsonl"
    append(spool, range(500))
    with open(spool, "a") as fh:
        fh.write(spool_line(500)[:30])  # Envoy is mid-write: not shipped yet
    async with als_server(store) as address:
        shipper = SpoolShipper(spool, address, "gateway/g1", batch_bytes=16_384)
        await ship_all(shipper)
        assert sorted(store.records) == [f"req-{i:05d}" for i in range(500)]
        assert store.appends > 1  # several batches, each committed before its answer
        assert {r.gateway for r in store.records.values()} == {"gateway/g1"}
        done = read_checkpoint(shipper.checkpoint_path)
        assert done.inode == os.stat(spool).st_ino
        assert done.offset == spool.read_bytes().rindex(b"\n") + 1
        with open(spool, "a") as fh:
            fh.write(spool_line(500)[30:] + "\n")
        append(spool, range(501, 510))
        # a new shipper (after a restart) resumes from the checkpoint
        again = SpoolShipper(spool, address, "gateway/g1")
        appends = store.appends
        await ship_all(again)
        assert len(store.records) == 510 and store.appends == appends + 1
        await again.close()
        await shipper.close()

        # lost checkpoint: everything is resent, and the store keeps one copy of each
        shipper.checkpoint_path.unlink()
        fresh = SpoolShipper(spool, address, "gateway/g1")
        await ship_all(fresh)
        assert len(store.records) == 510
        await fresh.close()


async def test_nothing_moves_while_the_control_plane_is_down_or_failing(tmp_path: Path) -> None:
    store = MemoryStore()
    spool = tmp_path / "audit-spool.jsonl"
    append(spool, range(100))
    port = free_port()
    shipper = SpoolShipper(spool, f"127.0.0.1:{port}", "gateway/g1", timeout=2)
    with pytest.raises(grpc.aio.AioRpcError):
        await shipper.ship_once()
    assert read_checkpoint(shipper.checkpoint_path).offset == 0

    async with als_server(store, port=port):
        store.fail = True
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await shipper.ship_once()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert read_checkpoint(shipper.checkpoint_path).offset == 0

    # run() keeps retrying until a control plane is back on the port
    task = asyncio.create_task(shipper.run())
    await asyncio.sleep(0.5)
    store.fail = False
    async with als_server(store, port=port):
        for _ in range(100):
            if len(store.records) == 100:
                break
            await asyncio.sleep(0.1)
        assert len(store.records) == 100
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_rotation_and_truncation_lose_nothing(tmp_path: Path) -> None:
    store = MemoryStore()
    spool = tmp_path / "audit-spool.jsonl"
    reopened: list[int] = []

    async def reopen_logs(_: web.Request) -> web.Response:
        # what Envoy does on /reopen_logs: later lines go to a new file at the same path
        reopened.append(1)
        append(spool, range(1000 + 10 * len(reopened), 1005 + 10 * len(reopened)))
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_post("/reopen_logs", reopen_logs)
    runner = web.AppRunner(app)
    await runner.setup()
    admin = EnvoyAdmin(tmp_path / "admin.sock")  # Envoy's admin is a unix socket
    await web.UnixSite(runner, str(admin.socket)).start()
    try:
        append(spool, range(50))
        first_inode = os.stat(spool).st_ino
        assert spool.stat().st_size > 10_000
        async with als_server(store) as address:
            shipper = SpoolShipper(
                spool, address, "gateway/g1", envoy_admin=admin, rotate_bytes=10_000
            )
            await ship_all(shipper)  # ships, then rotates: the spool is renamed, Envoy reopens
            assert reopened == [1]
            assert spool.exists() and os.stat(spool).st_ino != first_inode
            # lines Envoy flushed to the old file before it switched are shipped first
            append(spool.with_name(spool.name + ".1"), [60, 61])
            await ship_all(shipper)
            await ship_all(shipper)
            assert not spool.with_name(spool.name + ".1").exists()  # drained, then deleted
            assert reopened == [1]
            expected = {f"req-{i:05d}" for i in [*range(50), 60, 61, *range(1010, 1015)]}
            assert set(store.records) >= expected

            # truncation by hand: read again from the start, nothing new is skipped
            spool.write_text("")
            append(spool, range(2000, 2003))
            await ship_all(shipper)
            assert {f"req-{i:05d}" for i in range(2000, 2003)} <= set(store.records)
            # and a malformed line is skipped, not fatal
            with open(spool, "a") as fh:
                fh.write("{broken\n")
            append(spool, [2003])
            await ship_all(shipper)
            assert "req-02003" in store.records and shipper.skipped == 1
            await shipper.close()
    finally:
        await runner.cleanup()


async def test_only_the_node_a_token_names_may_log(tmp_path: Path) -> None:
    store = MemoryStore()
    authority = TokenAuthority(tmp_path / "state")
    gw_token, _ = authority.create("gateway/g1", 600)
    agent_token, _ = authority.create("agent/coder", 600)
    entry = entry_from_spool(spool_line(1, agent="researcher"))

    async with als_server(store, TokenAuthenticator(authority)) as address:
        channel = grpc.aio.insecure_channel(address)
        call = channel.stream_unary(
            METHOD,
            request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
            response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
        )

        async def send(node: str, token: str | None, agent: str = "researcher") -> grpc.StatusCode:
            message = als_pb2.StreamAccessLogsMessage()
            message.identifier.node.id = node
            e = message.http_logs.log_entry.add()
            e.CopyFrom(entry_from_spool(spool_line(len(store.records) + 10, agent=agent)))
            metadata = (("authorization", f"Bearer {token}"),) if token else None
            try:
                await call(iter([message]), metadata=metadata, timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        assert await send("gateway/g1", None) == grpc.StatusCode.UNAUTHENTICATED
        assert await send("gateway/g1", "forged.jwt.value") == grpc.StatusCode.UNAUTHENTICATED
        assert await send("gateway/other", gw_token) == grpc.StatusCode.UNAUTHENTICATED
        assert await send("agent/coder/1", gw_token) == grpc.StatusCode.UNAUTHENTICATED
        assert not store.records
        # a sidecar logs only for its own agent
        assert await send("agent/coder/1", agent_token) == grpc.StatusCode.PERMISSION_DENIED
        assert not store.records
        assert await send("agent/coder/1", agent_token, agent="coder") == grpc.StatusCode.OK
        # a gateway logs for whichever agent it served
        assert await send("gateway/g1", gw_token) == grpc.StatusCode.OK
        assert sorted((r.gateway, r.agent) for r in store.records.values()) == [
            ("agent/coder/1", "coder"),
            ("gateway/g1", "researcher"),
        ]
        # an entry whose first message names no node is refused
        bare = als_pb2.StreamAccessLogsMessage()
        bare.http_logs.log_entry.add().CopyFrom(entry)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(iter([bare]), metadata=(("authorization", f"Bearer {gw_token}"),))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await channel.close()


async def test_a_refused_token_is_replaced_and_shipping_resumes(tmp_path: Path) -> None:
    """Each batch is a new stream: a token that expired since start must not stop shipping."""
    store = MemoryStore()
    authority = TokenAuthority(tmp_path / "state")
    expired, claims = authority.create("gateway/g1", 600)
    authority.revoke(claims.token_id)  # refused like an expired one: UNAUTHENTICATED
    fresh, _ = authority.create("gateway/g1", 600)
    spool = tmp_path / "audit-spool.jsonl"
    append(spool, range(3))
    async with als_server(store, TokenAuthenticator(authority)) as address:
        shipper = SpoolShipper(
            spool,
            address,
            "gateway/g1",
            (("authorization", f"Bearer {expired}"),),
            refresh_metadata=lambda: (("authorization", f"Bearer {fresh}"),),
        )
        task = asyncio.create_task(shipper.run())
        for _ in range(50):
            if len(store.records) == 3:
                break
            await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(store.records) == 3


async def test_a_stream_ending_mid_commit_answers_only_after_every_record_is_stored() -> None:
    """The periodic flush may hold a batch when the client half-closes: it must finish, not be
    cancelled, or the OK would move the checkpoint past records never stored."""
    import threading

    store = MemoryStore()
    release = threading.Event()
    writer = AuditWriter(lambda: store)
    service = AuditIngest(writer, allow_all, flush_interval=0.1)
    await service.start()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # keep the store's one writer thread busy, so the flusher's append waits its turn
    busy = asyncio.ensure_future(writer._run(lambda: release.wait(5)))

    async def messages() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        for i in (1, 2):
            message = als_pb2.StreamAccessLogsMessage()
            message.identifier.node.id = "gateway/g1"
            message.http_logs.log_entry.add().CopyFrom(entry_from_spool(spool_line(i)))
            yield message
            await asyncio.sleep(0.3)  # past the flush interval: the flusher takes record 1

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary(
                METHOD,
                request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
                response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
            )
            answer = asyncio.ensure_future(call(messages(), timeout=10))
            await asyncio.sleep(0.8)
            assert not answer.done()  # still waiting on the busy store
            release.set()
            await answer
        assert sorted(store.records) == ["req-00001", "req-00002"]
    finally:
        release.set()
        await busy
        await server.stop(grace=0)
        await service.stop()

"""Each control-plane service alone, with fakes for the narrow interfaces it depends on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from builders import DEST_YAML as DEST
from builders import MESH_YAML as MESH
from builders import model

from meshgate.audit.store import AuditLogStore
from meshgate.controlplane.admin import AdminServer, IdentityOps
from meshgate.controlplane.cache import SnapshotCache
from meshgate.controlplane.pipeline import CompiledPolicy, PolicyPipeline
from meshgate.controlplane.policy_state import PolicyState
from meshgate.controlplane.publisher import SnapshotPublisher
from meshgate.controlplane.runtime_inputs import Inputs
from meshgate.controlplane.secrets import EnvSecrets
from meshgate.controlplane.sources import Candidate, SourceFailure
from meshgate.controlplane.xds_server import XdsServer
from meshgate.errors import ConfigError, MeshgateError
from meshgate.xds.options import TranslateOptions
from meshgate.xds.snapshot import Snapshot


def _candidate(*destinations: str, broken: bool = False) -> Candidate:
    files = {"mesh.yaml": MESH} | {f"{d}.yaml": DEST % (d, d) for d in destinations}
    if broken:
        files["bad.yaml"] = "kind: Nope\n"
    return Candidate(files, None, f"test:{'+'.join(destinations)}", Path("."))


class ListSource:
    description = "list"

    def __init__(self, changes: list[Candidate | SourceFailure]) -> None:
        self.items = changes

    async def changes(self) -> AsyncIterator[Candidate | SourceFailure]:
        for item in self.items:
            yield item
            await asyncio.sleep(0.1)  # past the debounce: each is its own change
        await asyncio.Event().wait()


class Counting:
    def __init__(self) -> None:
        self.applied = self.rejected = 0

    def policy_applied(self) -> None:
        self.applied += 1

    def policy_rejected(self) -> None:
        self.rejected += 1


class RefusingConsumer:
    """Serves every policy except those with a destination named `refused`."""

    def __init__(self) -> None:
        self.served: list[CompiledPolicy] = []

    async def apply_policy(self, policy: CompiledPolicy) -> None:
        if any(d.name == "refused" for d in policy.model.destinations):
            raise MeshgateError("translation refused it")
        self.served.append(policy)


async def test_pipeline_keeps_the_last_good_policy_and_reports_each_refusal() -> None:
    source = ListSource(
        [
            _candidate("alpha"),
            _candidate("alpha", broken=True),  # does not validate
            SourceFailure(["cannot read the directory"]),
            _candidate("refused"),  # validates, the consumer refuses it
        ]
    )
    consumer, metrics = RefusingConsumer(), Counting()
    pipeline = PolicyPipeline(source, consumer, metrics, quiet=0.01, max_delay=0.05)
    await pipeline.start()
    try:
        await asyncio.sleep(0.7)
    finally:
        await pipeline.stop()
    assert [p.origin for p in consumer.served] == ["test:alpha"]
    assert pipeline.state.model is not None
    assert [d.name for d in pipeline.state.model.destinations] == ["alpha"]
    assert pipeline.state.rejection is not None
    assert pipeline.state.rejection.problems == ["translation refused it"]
    assert (metrics.applied, metrics.rejected) == (1, 3)


class FixedInputs:
    def __init__(self) -> None:
        self.followed: list[CompiledPolicy] = []

    async def read(self, policy: CompiledPolicy) -> Inputs:
        return Inputs({}, None)

    async def follow(self, policy: CompiledPolicy) -> None:
        self.followed.append(policy)


class RecordingCache:
    def __init__(self) -> None:
        self.sets: list[Mapping[str, Snapshot]] = []

    def set_snapshots(self, snapshots: Mapping[str, Snapshot]) -> object:
        self.sets.append(snapshots)
        return None


def _compiled(version: str) -> CompiledPolicy:
    m = model(version)
    return CompiledPolicy(m, m, EnvSecrets(), f"test:{version}")


async def test_publisher_applies_inputs_only_for_the_policy_that_serves() -> None:
    cache, inputs = RecordingCache(), FixedInputs()
    publisher = SnapshotPublisher(cache, TranslateOptions(), inputs)
    v1, v2 = _compiled("v1"), _compiled("v2")
    await publisher.apply_policy(v1)
    assert inputs.followed == [v1] and len(cache.sets) == 1
    assert set(cache.sets[0]) == {"gateway", "agent/researcher"}

    def with_endpoints(now: Inputs) -> Inputs:
        return Inputs(now.secrets, now.identities, {"alpha": (("10.0.0.1", 80),)})

    assert not await publisher.update_inputs(v1, lambda now: now)  # nothing new: no rebuild
    await publisher.apply_policy(v2)
    assert not await publisher.update_inputs(v1, with_endpoints)  # read for a replaced policy
    assert len(cache.sets) == 2
    assert await publisher.update_inputs(v2, with_endpoints)
    assert len(cache.sets) == 3
    assert publisher.serving is not None and publisher.serving.inputs.endpoints


class FakeView:
    def __init__(self) -> None:
        self.ready = False
        self.policy = PolicyState("fake")
        self.identity: IdentityOps | None = None
        self.audit_log: AuditLogStore | None = None
        self.limit_store = None

    def status_json(self) -> dict[str, Any]:
        return {"fake": True}

    def metrics_text(self) -> bytes:
        return b"# nothing\n"


async def test_admin_server_serves_a_view_on_a_port_it_reports() -> None:
    view = FakeView()
    server = AdminServer(view, "t" * 43, "127.0.0.1", 0)
    await server.start()
    try:
        assert server.port != 0
        base = f"http://{server.address}"
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{base}/readyz")).status_code == 503
            view.ready = True
            assert (await client.get(f"{base}/readyz")).status_code == 200
            assert (await client.get(f"{base}/status")).status_code == 401
            ok = await client.get(f"{base}/status", headers={"Authorization": "Bearer " + "t" * 43})
            assert ok.json() == {"fake": True}
            rotate = await client.post(
                f"{base}/v1/ca/rotate", headers={"Authorization": "Bearer " + "t" * 43}
            )
            assert rotate.status_code == 409  # no identity operations: mTLS off
        taken = AdminServer(view, "t" * 43, "127.0.0.1", server.port)
        with pytest.raises(ConfigError, match="cannot listen for admin HTTP"):
            await taken.start()
    finally:
        await server.stop()


async def test_xds_server_binds_port_zero_and_refuses_a_taken_port() -> None:
    cache = SnapshotCache()
    from meshgate.controlplane.ads import AdsService
    from meshgate.controlplane.registry import NodeRegistry

    server = XdsServer("127.0.0.1", 0, [AdsService(cache, NodeRegistry()).handler()])
    await server.start()
    try:
        assert server.port != 0
        async with grpc.aio.insecure_channel(server.address) as channel:
            await asyncio.wait_for(channel.channel_ready(), 5)
        taken = XdsServer("127.0.0.1", server.port, [])
        with pytest.raises(ConfigError, match=r"cannot listen for xDS.*: Address already in use"):
            await taken.start()
        # the reason, not a guess: a name that does not resolve, an address not of this host
        with pytest.raises(ConfigError, match=r"cannot resolve .no-such-host\.invalid."):
            await XdsServer("no-such-host.invalid", 0, []).start()
        with pytest.raises(ConfigError, match="Cannot assign requested address"):
            await XdsServer("192.0.2.1", 0, []).start()
    finally:
        await server.stop(grace=0)


class MemoryStore:
    def __init__(self) -> None:
        self.ids: set[str] = set()

    def append(self, records: Any) -> int:
        before = len(self.ids)
        self.ids.update(r.request_id for r in records)
        return len(self.ids) - before

    def close(self) -> None:
        pass


async def test_audit_ingest_refuses_undecodable_bytes_and_keeps_serving() -> None:
    from envoy.service.accesslog.v3 import als_pb2

    from meshgate.audit.spool import METHOD
    from meshgate.controlplane.access_log import AuditIngest, AuditWriter

    store = MemoryStore()
    ingest = AuditIngest(AuditWriter(lambda: store))  # type: ignore[arg-type,return-value]
    await ingest.start()
    server = XdsServer("127.0.0.1", 0, [ingest.handler()])
    await server.start()
    good = als_pb2.StreamAccessLogsMessage()
    good.identifier.node.id = "gateway/g1"
    good.http_logs.log_entry.add().request.request_id = "req-1"
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = channel.stream_unary(
                METHOD,
                request_serializer=lambda raw: raw,
                response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(iter([b"\xff\xff\xff"]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await call(iter([good.SerializeToString()]), timeout=10)
        assert store.ids == {"req-1"}
    finally:
        await server.stop(grace=0)
        await ingest.stop()


class ChangingSecrets:
    description = "changing"

    def __init__(self) -> None:
        self.value = "one"

    def read(self, name: str) -> str | None:
        return self.value


class Recorder:
    def __init__(self) -> None:
        self.inputs: list[Inputs] = []
        self.current = Inputs({}, None)

    async def update_inputs(self, policy: CompiledPolicy, change: Any) -> bool:
        fresh = change(self.current)
        if fresh == self.current:
            return False
        self.current = fresh
        self.inputs.append(fresh)
        return True


async def test_runtime_inputs_report_a_rotated_secret_to_their_consumer() -> None:
    from meshgate.controlplane.runtime_inputs import RuntimeInputs
    from meshgate.policy.model import Credentials, Destination

    dest = Destination(
        "alpha",
        "alpha.internal",
        80,
        tls="none",
        address=("127.0.0.1", 9),
        credentials=Credentials("Authorization", "key", "{secret}"),
    )
    m = model("v1", (dest,))
    provider = ChangingSecrets()
    policy = CompiledPolicy(m, m, provider, "test")
    recorder = Recorder()
    inputs = RuntimeInputs(None, lambda: recorder, interval=0.05)
    assert (await inputs.read(policy)).secrets == {"key": "one"}
    await inputs.start()
    try:
        await inputs.follow(policy)
        await asyncio.sleep(0.3)
        assert [i.secrets for i in recorder.inputs] == [{"key": "one"}]
        provider.value = "two"
        await asyncio.sleep(0.3)
        assert [i.secrets for i in recorder.inputs] == [{"key": "one"}, {"key": "two"}]
        assert recorder.current.identities is None  # mTLS off: no issuer
    finally:
        await inputs.stop()


async def test_audit_ingest_answers_a_backed_up_stream_only_after_storing_all_of_it() -> None:
    """A full hand-over queue behind a busy store when the client half-closes: the end of the
    stream must wait for room, never push queued messages out."""
    import threading

    from envoy.service.accesslog.v3 import als_pb2

    from meshgate.audit.spool import METHOD
    from meshgate.controlplane.access_log import (
        DECODING,
        QUEUE_MESSAGES,
        AuditIngest,
        AuditWriter,
    )

    store, release = MemoryStore(), threading.Event()
    writer = AuditWriter(lambda: store)  # type: ignore[arg-type,return-value]
    ingest = AuditIngest(writer, batch_size=1)  # a commit per message: the queue backs up
    await ingest.start()
    server = XdsServer("127.0.0.1", 0, [ingest.handler()])
    await server.start()
    busy = asyncio.ensure_future(writer._run(lambda: release.wait(10)))
    # one taken by the blocked commit, DECODING more being decoded, the queue full behind them
    total = QUEUE_MESSAGES + DECODING + 1
    messages = []
    for i in range(total):
        message = als_pb2.StreamAccessLogsMessage()
        message.identifier.node.id = "gateway/g1"
        message.http_logs.log_entry.add().request.request_id = f"req-{i}"
        messages.append(message.SerializeToString())
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = channel.stream_unary(
                METHOD,
                request_serializer=lambda raw: raw,
                response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
            )
            answer = asyncio.ensure_future(call(iter(messages), timeout=20))
            await asyncio.sleep(0.5)
            assert not answer.done()  # the store has not taken anything yet
            release.set()
            await answer
        assert store.ids == {f"req-{i}" for i in range(total)}
    finally:
        release.set()
        await busy
        await server.stop(grace=0)
        await ingest.stop()

"""ADS over real gRPC streams: nonces, ACK/NACK, ordering, subscriptions, delta, bad input."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from builders import AdsClient, ads_server, model
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from meshgate.policy.model import Destination
from meshgate.xds import types
from meshgate.xds.build import build_snapshots

NODE = base_pb2.Node(id="gateway/test", cluster="meshgate-gateway")


def req(type_url: str, nonce: str = "", version: str = "", names=(), error: str | None = None):
    r = discovery_pb2.DiscoveryRequest(
        node=NODE,
        type_url=type_url,
        response_nonce=nonce,
        version_info=version,
        resource_names=list(names),
    )
    if error is not None:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def cluster_names(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for any_ in resp.resources:
        c = cluster_pb2.Cluster()
        any_.Unpack(c)
        out.append(c.name)
    return out


def cds_version(m) -> str:  # type: ignore[no-untyped-def]
    """The gateway's CDS version for a model: a content hash, never the policy version."""
    return build_snapshots(m)["gateway"].version(types.CLUSTER)


def with_extra_destination(version: str):  # type: ignore[no-untyped-def]
    m = model(version)
    extra = Destination("gamma", "gamma.internal", 80, tls="none", address=("127.0.0.1", 9003))
    return dataclasses.replace(m, destinations=(*m.destinations, extra))


async def test_sotw_first_response_ack_and_push_on_change() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        c = AdsClient(h.address)
        c.send(req(types.CLUSTER))
        r1 = await c.recv()
        assert r1.type_url == types.CLUSTER
        assert r1.version_info == cds_version(model("v1"))
        assert "v1" not in r1.version_info
        assert r1.nonce
        assert cluster_names(r1) == ["dest-alpha", "dest-beta"]
        c.send(req(types.CLUSTER, r1.nonce, r1.version_info))
        await c.expect_silence()
        h.cache.set_snapshots(build_snapshots(with_extra_destination("v2")))
        r2 = await c.recv()
        assert r2.version_info == cds_version(with_extra_destination("v2"))
        assert r2.nonce != r1.nonce
        assert cluster_names(r2) == ["dest-alpha", "dest-beta", "dest-gamma"]
        [conn] = h.registry.connections()
        assert conn.types[types.CLUSTER].version_acked == r1.version_info
        await c.close()


async def test_sotw_no_push_while_unacked_then_latest_only() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        c = AdsClient(h.address)
        c.send(req(types.CLUSTER))
        r1 = await c.recv()
        h.cache.set_snapshots(build_snapshots(with_extra_destination("v2")))
        m3 = dataclasses.replace(model("v3"), destinations=model().destinations[:1])
        h.cache.set_snapshots(build_snapshots(m3))
        await c.expect_silence()  # r1 is un-ACKed: hold
        c.send(req(types.CLUSTER, r1.nonce, r1.version_info))
        r3 = await c.recv()
        assert r3.version_info == cds_version(m3)
        assert cluster_names(r3) == ["dest-alpha"]
        await c.close()


async def test_sotw_policy_change_with_same_content_sends_nothing() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        c = AdsClient(h.address)
        c.send(req(types.CLUSTER))
        r1 = await c.recv()
        c.send(req(types.CLUSTER, r1.nonce, r1.version_info))
        await c.expect_silence()
        h.cache.set_snapshots(build_snapshots(model("v2")))  # new policy version, same clusters
        await c.expect_silence()
        [conn] = h.registry.connections()
        assert conn.to_json()["types"]["cds"]["policy"] == "v2"  # on v2 all the same
        await c.close()


async def test_sotw_nack_recorded_not_resent_next_version_pushed() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        c = AdsClient(h.address)
        c.send(req(types.CLUSTER))
        r1 = await c.recv()
        c.send(req(types.CLUSTER, r1.nonce, "", error="cluster dest-alpha: bad thing"))
        await c.expect_silence()
        [conn] = h.registry.connections()
        assert conn.last_nack is not None
        assert conn.last_nack.message == "cluster dest-alpha: bad thing"
        assert conn.last_nack.version == r1.version_info
        assert conn.types[types.CLUSTER].version_acked is None
        # same content again (a no-op policy reload) must not re-send the rejected version
        h.cache.set_snapshots(build_snapshots(model("v1")))
        await c.expect_silence()
        h.cache.set_snapshots(build_snapshots(with_extra_destination("v2")))
        r2 = await c.recv()
        assert r2.version_info == cds_version(with_extra_destination("v2"))
        assert [n.message for n in h.registry.nacks()] == ["cluster dest-alpha: bad thing"]
        await c.close()


async def test_sotw_stale_nonce_ignored() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        c = AdsClient(h.address)
        c.send(req(types.CLUSTER))
        r1 = await c.recv()
        c.send(req(types.CLUSTER, r1.nonce, r1.version_info))
        h.cache.set_snapshots(build_snapshots(with_extra_destination("v2")))
        r2 = await c.recv()
        c.send(req(types.CLUSTER, r1.nonce, r1.version_info, error="old"))  # stale NACK
        await c.expect_silence()
        [conn] = h.registry.connections()
        assert conn.last_nack is None
        assert conn.types[types.CLUSTER].in_flight
        c.send(req(types.CLUSTER, r2.nonce, r2.version_info))
        await c.expect_silence()
        assert conn.types[types.CLUSTER].version_acked == r2.version_info
        await c.close()


async def test_sotw_named_subscription_and_change_of_names() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        c = AdsClient(h.address)
        c.send(req(types.ENDPOINT, names=["dest-alpha"]))
        r1 = await c.recv()
        assert len(r1.resources) == 1
        c.send(req(types.ENDPOINT, r1.nonce, r1.version_info, names=["dest-alpha", "dest-beta"]))
        r2 = await c.recv()
        assert len(r2.resources) == 2
        assert r2.version_info == r1.version_info
        await c.close()


async def test_push_order_clusters_before_listeners_and_routes() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        c = AdsClient(h.address)
        acks = {}
        for t in (types.LISTENER, types.ROUTE, types.CLUSTER):
            names = ["egress-routes"] if t == types.ROUTE else []
            c.send(req(t, names=names))
            r = await c.recv()
            acks[t] = (r.nonce, r.version_info, names)
        for t, (nonce, version, names) in acks.items():
            c.send(req(t, nonce, version, names=names))
        await c.expect_silence()
        extra = with_extra_destination("v2").destinations  # new cluster and route
        h.cache.set_snapshots(build_snapshots(model("v2", extra, listen_port=15002)))  # listener
        got = [(await c.recv()).type_url for _ in range(3)]
        assert got == [types.CLUSTER, types.LISTENER, types.ROUTE]
        await c.close()


async def test_node_waits_for_first_snapshot() -> None:
    async with ads_server() as h:
        c = AdsClient(h.address)
        c.send(req(types.CLUSTER))
        await c.expect_silence()
        h.cache.set_snapshots(build_snapshots(model("v1")))
        r = await c.recv()
        assert r.version_info == cds_version(model("v1"))
        await c.close()


def dreq(
    type_url: str,
    subscribe=(),
    unsubscribe=(),
    nonce: str = "",
    error: str | None = None,
    initial=None,
):  # type: ignore[no-untyped-def]
    r = discovery_pb2.DeltaDiscoveryRequest(
        node=NODE,
        type_url=type_url,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    if error is not None:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


async def test_delta_sends_only_changes_and_removals() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        c = AdsClient(h.address, delta=True)
        c.send(dreq(types.CLUSTER))
        r1 = await c.recv()
        assert sorted(r.name for r in r1.resources) == ["dest-alpha", "dest-beta"]
        c.send(dreq(types.CLUSTER, nonce=r1.nonce))
        await c.expect_silence()
        # a route-only change: clusters unchanged, nothing sent on CDS
        h.cache.set_snapshots(build_snapshots(model("v1", listen_port=15009)))
        await c.expect_silence()
        h.cache.set_snapshots(build_snapshots(with_extra_destination("v2")))
        r2 = await c.recv()
        assert [r.name for r in r2.resources] == ["dest-gamma"]
        assert list(r2.removed_resources) == []
        c.send(dreq(types.CLUSTER, nonce=r2.nonce))
        m = model("v3")
        h.cache.set_snapshots(
            build_snapshots(dataclasses.replace(m, destinations=m.destinations[:1]))
        )
        r3 = await c.recv()
        assert list(r3.resources) == []
        assert list(r3.removed_resources) == ["dest-beta", "dest-gamma"]
        await c.close()


async def test_delta_reconnect_with_initial_versions_gets_only_stale() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        c = AdsClient(h.address, delta=True)
        c.send(dreq(types.CLUSTER))
        r1 = await c.recv()
        versions = {r.name: r.version for r in r1.resources}
        await c.close()
        versions["dest-beta"] = "outdated"
        c2 = AdsClient(h.address, delta=True)
        c2.send(dreq(types.CLUSTER, initial=versions))
        r2 = await c2.recv()
        assert [r.name for r in r2.resources] == ["dest-beta"]
        await c2.close()


async def test_delta_nack_not_resent() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        c = AdsClient(h.address, delta=True)
        c.send(dreq(types.CLUSTER))
        r1 = await c.recv()
        c.send(dreq(types.CLUSTER, nonce=r1.nonce, error="no"))
        await c.expect_silence()
        h.cache.set_snapshots(build_snapshots(model("v1", listen_port=15010)))
        await c.expect_silence()
        [conn] = h.registry.connections()
        assert conn.last_nack is not None and conn.last_nack.message == "no"
        await c.close()


async def test_delta_named_subscribe_unsubscribe() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        c = AdsClient(h.address, delta=True)
        c.send(dreq(types.ENDPOINT, subscribe=["dest-alpha"]))
        r1 = await c.recv()
        assert [r.name for r in r1.resources] == ["dest-alpha"]
        c.send(dreq(types.ENDPOINT, subscribe=["dest-beta"], nonce=r1.nonce))
        r2 = await c.recv()
        assert [r.name for r in r2.resources] == ["dest-beta"]
        await c.close()


async def test_unknown_type_url_is_invalid_argument_and_others_keep_working() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        good = AdsClient(h.address)
        good.send(req(types.CLUSTER))
        r1 = await good.recv()
        bad = AdsClient(h.address)
        bad.send(req("type.googleapis.com/made.up.Thing"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await bad.recv()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unsupported type_url" in (err.value.details() or "")
        good.send(req(types.CLUSTER, r1.nonce, r1.version_info))
        h.cache.set_snapshots(build_snapshots(with_extra_destination("v2")))
        assert (await good.recv()).version_info == cds_version(with_extra_destination("v2"))
        await good.close()
        await bad.close()


async def test_missing_or_malformed_node_id_refused() -> None:
    async with ads_server() as h:
        c = AdsClient(h.address)
        c.send(discovery_pb2.DiscoveryRequest(type_url=types.CLUSTER))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.recv()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node.id" in (err.value.details() or "")
        c2 = AdsClient(h.address)
        c2.send(
            discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="BAD ID"), type_url=types.CLUSTER)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err2:
            await c2.recv()
        assert "gateway/<name>" in (err2.value.details() or "")
        await c.close()
        await c2.close()


async def test_garbage_bytes_end_only_that_stream() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        channel = grpc.aio.insecure_channel(h.address)
        raw = channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )

        async def garbage():  # type: ignore[no-untyped-def]
            yield b"\xff\xff\xff\xff\x0f\x01garbage"

        call = raw(garbage())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() != grpc.StatusCode.OK
        await channel.close()
        good = AdsClient(h.address)
        good.send(req(types.CLUSTER))
        assert (await good.recv()).version_info == cds_version(model("v1"))
        await good.close()

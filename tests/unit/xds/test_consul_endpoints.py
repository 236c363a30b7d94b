"""Consul-backed destinations in the gateway snapshot: an EDS cluster whose assignment is the
catalogue's instances, and an instance change that is an EDS change and nothing else, both in
the snapshot versions and on a real ADS stream."""

from __future__ import annotations

from builders import AdsClient, ads_server, model
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshgate.policy.model import AgentPolicy, ConsulService, Destination, EgressRule
from meshgate.xds import types
from meshgate.xds.build import build_snapshots
from meshgate.xds.nodes import GATEWAY_GROUP

INVENTORY = Destination(
    "inventory", "inventory.internal", 80, tls="none", consul=ConsulService("inventory")
)
STATIC = Destination("alpha", "alpha.internal", 80, tls="none", address=("127.0.0.1", 9001))
AGENTS = (AgentPolicy("researcher", "researcher", (EgressRule("inventory"),)),)
TWO = {"inventory": [("127.0.0.2", 8080), ("127.0.0.1", 8080)]}
ONE = {"inventory": [("127.0.0.1", 8080)]}


def consul_model():  # type: ignore[no-untyped-def]
    return model("v1", destinations=(STATIC, INVENTORY), agents=AGENTS)


def assignment(snapshot, name: str = "dest-inventory") -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    cla = endpoint_pb2.ClusterLoadAssignment()
    cla.ParseFromString(_payload(snapshot.of_type(types.ENDPOINT)[name].any_bytes))
    return [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for loc in cla.endpoints
        for e in loc.lb_endpoints
    ]


def _payload(any_bytes: bytes) -> bytes:
    from google.protobuf import any_pb2

    packed = any_pb2.Any()
    packed.ParseFromString(any_bytes)
    return packed.value


def test_consul_destination_is_an_eds_cluster_with_sorted_instances() -> None:
    snap = build_snapshots(consul_model(), endpoints=TWO)[GATEWAY_GROUP]
    cluster = cluster_pb2.Cluster()
    cluster.ParseFromString(_payload(snap.of_type(types.CLUSTER)["dest-inventory"].any_bytes))
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert assignment(snap) == [("127.0.0.1", 8080), ("127.0.0.2", 8080)]
    # no instances known (or zero healthy): an empty assignment, so Envoy answers 503
    empty = build_snapshots(consul_model())[GATEWAY_GROUP]
    assert assignment(empty) == []
    assert "dest-inventory" in empty.of_type(types.ENDPOINT)


def test_an_instance_change_changes_only_the_eds_version() -> None:
    before = build_snapshots(consul_model(), endpoints=TWO)
    after = build_snapshots(consul_model(), endpoints=ONE)
    gw_before, gw_after = before[GATEWAY_GROUP], after[GATEWAY_GROUP]
    for t in (types.CLUSTER, types.LISTENER, types.ROUTE, types.SECRET):
        assert gw_before.version(t) == gw_after.version(t), t
    assert gw_before.version(types.ENDPOINT) != gw_after.version(types.ENDPOINT)
    # only the consul destination's resource changed; the static one kept its version
    eds_b, eds_a = gw_before.of_type(types.ENDPOINT), gw_after.of_type(types.ENDPOINT)
    assert eds_b["dest-alpha"].version == eds_a["dest-alpha"].version
    assert eds_b["dest-inventory"].version != eds_a["dest-inventory"].version
    # sidecars never see endpoints
    assert before["agent/researcher"].type_versions == after["agent/researcher"].type_versions


NODE = base_pb2.Node(id="gateway/test", cluster="meshgate-gateway")


def req(type_url: str, nonce: str = "", version: str = "", names=()):  # type: ignore[no-untyped-def]
    return discovery_pb2.DiscoveryRequest(
        node=NODE,
        type_url=type_url,
        response_nonce=nonce,
        version_info=version,
        resource_names=list(names),
    )


async def test_envoy_gets_only_an_eds_push_when_instances_change() -> None:
    async with ads_server() as h:
        h.cache.set_snapshots(build_snapshots(consul_model(), endpoints=TWO))
        c = AdsClient(h.address)
        eds_names = ["dest-alpha", "dest-inventory"]
        subscriptions = [
            (types.CLUSTER, ()),
            (types.ENDPOINT, eds_names),
            (types.LISTENER, ()),
            (types.ROUTE, ["egress-routes"]),
        ]
        for type_url, names in subscriptions:
            c.send(req(type_url, names=names))
            first = await c.recv()
            assert first.type_url == type_url
            c.send(req(type_url, first.nonce, first.version_info, names))
        await c.expect_silence()
        h.cache.set_snapshots(build_snapshots(consul_model(), endpoints=ONE))
        pushed = await c.recv()
        assert pushed.type_url == types.ENDPOINT
        c.send(req(types.ENDPOINT, pushed.nonce, pushed.version_info, eds_names))
        await c.expect_silence(0.5)  # no CDS, LDS or RDS follows
        clas = []
        for any_ in pushed.resources:
            cla = endpoint_pb2.ClusterLoadAssignment()
            any_.Unpack(cla)
            clas.append(cla.cluster_name)
        assert sorted(clas) == eds_names
        await c.close()

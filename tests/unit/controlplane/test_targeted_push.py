"""Targeted pushes over real gRPC streams: a change reaches only the node groups, and only the
types, whose content it changed (versions are content hashes, never the policy version)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import weakref

from builders import AdsClient, ads_server, model
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshgate.policy.model import AgentPolicy, EgressRule, PolicyModel
from meshgate.xds import types
from meshgate.xds.build import Identities, build_snapshots, clear_translation_caches
from meshgate.xds.mtls import NodeIdentity
from meshgate.xds.sidecar import GATEWAY_CLUSTER
from meshgate.xds.snapshot import Snapshot

AGENTS = ("a", "b", "c")
NODES = ("gateway/g1", "gateway/g2", "agent/a/1", "agent/a/2", "agent/b/1", "agent/c/1")


def mesh_model(version: str, b_rules: tuple[str, ...] = ("alpha",)) -> PolicyModel:
    rules = {"a": ("alpha",), "b": b_rules, "c": ("beta",)}
    agents = tuple(
        AgentPolicy(name, name, tuple(EgressRule(d) for d in rules[name])) for name in AGENTS
    )
    return model(version, agents=agents)


def identities(serial: dict[str, int]) -> Identities:
    def ident(who: str) -> NodeIdentity:
        n = serial.get(who, 0)
        return NodeIdentity(
            f"spiffe://agents.local/{who}", f"chain-{who}-{n}".encode(), b"key", b"trust"
        )

    return Identities(ident("gateway"), {a: ident(a) for a in AGENTS})


def group_of(node: str) -> str:
    return "gateway" if node.startswith("gateway/") else "/".join(node.split("/")[:2])


class Node:
    """A scripted Envoy: subscribes to every type its group has, ACKs whatever arrives."""

    def __init__(self, address: str, node_id: str, snapshot: Snapshot) -> None:
        self.id = node_id
        self.client = AdsClient(address)
        self.node = base_pb2.Node(id=node_id)
        self.subscriptions = {
            t: [] if t in types.WILDCARD_TYPES else sorted(snapshot.of_type(t))
            for t in types.TYPE_ORDER
            if t in types.WILDCARD_TYPES or snapshot.of_type(t)
        }

    async def start(self) -> None:
        for type_url, names in self.subscriptions.items():
            self.client.send(
                discovery_pb2.DiscoveryRequest(
                    node=self.node, type_url=type_url, resource_names=names
                )
            )
        got = await self.collect(len(self.subscriptions))
        assert sorted(got) == sorted(self.subscriptions), (self.id, got)

    async def collect(self, expect: int | None = None, quiet: float = 0.3) -> list[str]:
        """Type URLs of responses received (and ACKed) until `quiet` seconds pass without one."""
        got: list[str] = []
        while True:
            try:
                resp = await self.client.recv(timeout=5.0 if expect else quiet)
            except TimeoutError:
                return got
            got.append(resp.type_url)
            self.client.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url,
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                    resource_names=self.subscriptions[resp.type_url],
                )
            )
            if expect is not None and len(got) == expect:
                return got


async def received(nodes: list[Node]) -> dict[str, list[str]]:
    results = await asyncio.gather(*(n.collect() for n in nodes))
    return {n.id: r for n, r in zip(nodes, results, strict=True) if r}


def test_sidecar_content_depends_on_neither_policy_version_nor_other_agents() -> None:
    before = build_snapshots(mesh_model("v1"), identities=identities({}))
    after = build_snapshots(mesh_model("v2", ("alpha", "beta")), identities=identities({}))
    for agent in AGENTS:
        group = f"agent/{agent}"
        assert after[group].type_versions == before[group].type_versions, group
    assert after["gateway"].changed_types(before["gateway"]) == [types.ROUTE]
    no_op = build_snapshots(mesh_model("v3"), identities=identities({}))  # only the version
    assert no_op["gateway"].changed_types(before["gateway"]) == [types.ROUTE]  # its stamp
    assert all(v not in s for s in no_op["gateway"].type_versions.values() for v in ("v1", "v3"))


def test_mesh_wide_change_encodes_the_shared_cluster_once() -> None:
    """The gateway's port is in every sidecar's cluster: one encoding and one SotW body serve
    every agent, and their routes and secrets are the objects built before."""
    ids = identities({})
    before = build_snapshots(mesh_model("v1"), identities=ids)
    wide = mesh_model("v2")
    wide = dataclasses.replace(wide, mesh=dataclasses.replace(wide.mesh, gateway_listen_port=15077))
    after = build_snapshots(wide, identities=ids)
    groups = [f"agent/{a}" for a in AGENTS]
    assert len({id(after[g].of_type(types.CLUSTER)[GATEWAY_CLUSTER]) for g in groups}) == 1
    assert len({id(after[g].sotw_body(types.CLUSTER, None)) for g in groups}) == 1
    for g in groups:
        assert after[g].changed_types(before[g]) == [types.CLUSTER]
        for t in (types.ROUTE, types.SECRET):
            assert after[g].of_type(t) and all(
                res is before[g].of_type(t)[name] for name, res in after[g].of_type(t).items()
            )
    body = discovery_pb2.DiscoveryResponse.FromString(
        after[groups[0]].sotw_body(types.CLUSTER, None)
    )
    cluster = cluster_pb2.Cluster()
    body.resources[0].Unpack(cluster)
    endpoint = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint
    assert endpoint.address.socket_address.port_value == 15077
    assert body.version_info == after[groups[0]].version(types.CLUSTER)
    clear_translation_caches()  # the same content as translating each agent afresh
    fresh = build_snapshots(wide, identities=ids)
    assert {g: s.type_versions for g, s in fresh.items()} == {
        g: s.type_versions for g, s in after.items()
    }


def test_superseded_sidecar_snapshots_are_not_kept() -> None:
    """The memo hands out the served snapshot again, and forgets one nobody serves."""
    ids = identities({})
    first = build_snapshots(mesh_model("v1"), identities=ids)["agent/a"]
    assert build_snapshots(mesh_model("v2"), identities=ids)["agent/a"] is first
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None


async def test_one_agent_change_reaches_only_gateways_and_only_changed_types() -> None:
    async with ads_server() as h:
        ids = identities({})
        snaps = build_snapshots(mesh_model("v1"), identities=ids)
        h.cache.set_snapshots(snaps)
        nodes = [Node(h.address, n, snaps[group_of(n)]) for n in NODES]
        await asyncio.gather(*(n.start() for n in nodes))
        sent = h.service.sent  # responses counted on the server, per type
        assert sum(sent.values()) == sum(len(n.subscriptions) for n in nodes)
        before = collections.Counter(sent)

        # agent b's rules change: only the gateways' route table differs
        h.cache.set_snapshots(build_snapshots(mesh_model("v2", ("alpha", "beta")), identities=ids))
        assert await received(nodes) == {
            "gateway/g1": [types.ROUTE],
            "gateway/g2": [types.ROUTE],
        }
        assert sent - before == {types.ROUTE: 2}
        before = collections.Counter(sent)

        # agent b's certificate is renewed: only b's sidecar, only SDS
        ids2 = identities({"b": 1})
        h.cache.set_snapshots(build_snapshots(mesh_model("v2", ("alpha", "beta")), identities=ids2))
        assert await received(nodes) == {"agent/b/1": [types.SECRET]}
        assert sent - before == {types.SECRET: 1}

        # a new policy version with the same content: nothing at all but the gateways' stamp
        h.cache.set_snapshots(build_snapshots(mesh_model("v3", ("alpha", "beta")), identities=ids2))
        assert await received(nodes) == {"gateway/g1": [types.ROUTE], "gateway/g2": [types.ROUTE]}

        # a mesh-wide change (the gateway's port): every sidecar's cluster, the gateways' listener
        wide = mesh_model("v4", ("alpha", "beta"))
        wide = dataclasses.replace(
            wide, mesh=dataclasses.replace(wide.mesh, gateway_listen_port=15077)
        )
        h.cache.set_snapshots(build_snapshots(wide, identities=ids2))
        got = await received(nodes)
        assert got == {
            "gateway/g1": [types.LISTENER, types.ROUTE],
            "gateway/g2": [types.LISTENER, types.ROUTE],
            **{n: [types.CLUSTER] for n in NODES if n.startswith("agent/")},
        }
        for n in nodes:
            await n.client.close()


async def test_mesh_wide_change_is_pushed_a_bounded_number_of_streams_at_a_time() -> None:
    agents = tuple(AgentPolicy(f"x{i}", f"x{i}", (EgressRule("alpha"),)) for i in range(30))
    m1 = model("v1", agents=agents)
    async with ads_server(max_concurrent_pushes=3) as h:
        snaps = build_snapshots(m1)
        h.cache.set_snapshots(snaps)
        nodes = [Node(h.address, f"agent/x{i}", snaps[f"agent/x{i}"]) for i in range(30)]
        await asyncio.gather(*(n.start() for n in nodes))
        pusher = h.service.pusher
        m2 = dataclasses.replace(m1, mesh=dataclasses.replace(m1.mesh, gateway_listen_port=15078))
        h.cache.set_snapshots(build_snapshots(m2))
        assert (pusher.queue.in_flight, pusher.queue.pending) == (3, 27)  # the rest wait
        got = await received(nodes)
        assert got == {f"agent/x{i}": [types.CLUSTER] for i in range(30)}
        assert pusher.max_in_flight == 3
        assert pusher.queue.in_flight == pusher.queue.pending == 0
        for n in nodes:
            await n.client.close()


async def test_a_closed_stream_never_keeps_a_push_slot() -> None:
    """With one slot, a stream that went away (before or during its push) must not hold it:
    the streams behind it still get theirs, and the queue ends empty."""
    agents = tuple(AgentPolicy(f"x{i}", f"x{i}", (EgressRule("alpha"),)) for i in range(4))
    m1 = model("v1", agents=agents)
    async with ads_server(max_concurrent_pushes=1) as h:
        snaps = build_snapshots(m1)
        h.cache.set_snapshots(snaps)
        nodes = [Node(h.address, f"agent/x{i}", snaps[f"agent/x{i}"]) for i in range(4)]
        await asyncio.gather(*(n.start() for n in nodes))
        await nodes[0].client.close()  # first in line
        m2 = dataclasses.replace(m1, mesh=dataclasses.replace(m1.mesh, gateway_listen_port=15079))
        h.cache.set_snapshots(build_snapshots(m2))
        await nodes[2].client.close()  # while the others wait for the slot
        got = await received([nodes[1], nodes[3]])
        assert got == {"agent/x1": [types.CLUSTER], "agent/x3": [types.CLUSTER]}
        pusher = h.service.pusher
        await asyncio.wait_for(pusher.idle(), 5)
        assert pusher.queue.in_flight == pusher.queue.pending == 0
        for n in (nodes[1], nodes[3]):
            await n.client.close()

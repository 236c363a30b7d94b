"""Debounce coalesces bursts; the cache wakes only streams whose group changed."""

from __future__ import annotations

import asyncio

import pytest
from builders import model

from meshgate.controlplane.cache import SnapshotCache
from meshgate.controlplane.debounce import Debouncer
from meshgate.errors import ConsistencyError
from meshgate.xds.build import build_snapshots
from meshgate.xds.gateway import destination_cluster
from meshgate.xds.snapshot import Resource, Snapshot


async def test_burst_coalesces_into_one_push_of_the_newest_value() -> None:
    pushed: list[int] = []

    async def push(v: int) -> None:
        pushed.append(v)

    d: Debouncer[int] = Debouncer(push, quiet=0.05, max_delay=1.0)
    task = asyncio.create_task(d.run())
    for i in range(10):
        d.submit(i)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert pushed == [9]
    d.submit(42)
    await asyncio.sleep(0.2)
    assert pushed == [9, 42]
    task.cancel()


async def test_max_delay_bounds_a_never_ending_burst() -> None:
    pushed: list[int] = []

    async def push(v: int) -> None:
        pushed.append(v)

    d: Debouncer[int] = Debouncer(push, quiet=0.1, max_delay=0.25)
    task = asyncio.create_task(d.run())
    for i in range(40):  # a change every 20 ms for 0.8 s: never quiet for 100 ms
        d.submit(i)
        await asyncio.sleep(0.02)
    assert 2 <= len(pushed) <= 5
    task.cancel()


def test_cache_wakes_only_changed_groups_and_cancel_works() -> None:
    cache = SnapshotCache()
    woke: list[str] = []
    cancel = cache.watch("gateway", lambda n: woke.append("gw"))
    cache.watch("agent/x", lambda n: woke.append("x"))
    snaps = build_snapshots(model("v1"))
    assert cache.set_snapshots(snaps) == ["agent/researcher", "gateway"]
    assert woke == ["gw"]
    assert cache.set_snapshots(build_snapshots(model("v1"))) == []  # same content: no wake
    assert woke == ["gw"]
    cancel()
    cache.set_snapshots(build_snapshots(model("v2")))
    assert woke == ["gw"]


def test_snapshot_refuses_cluster_without_its_endpoints() -> None:
    dest = model().destinations[0]
    from meshgate.xds.options import DEFAULT_CA_BUNDLE

    cluster = destination_cluster(dest, DEFAULT_CA_BUNDLE)
    with pytest.raises(ConsistencyError, match="needs endpoints 'dest-alpha'"):
        Snapshot.build("v1", [Resource.build(cluster.name, cluster)])


def test_same_policy_gives_byte_identical_snapshots() -> None:
    a = build_snapshots(model("v1"))["gateway"]
    b = build_snapshots(model("v1"))["gateway"]
    for type_url, resources in a.resources.items():
        assert {n: r.any_bytes for n, r in resources.items()} == {
            n: r.any_bytes for n, r in b.resources[type_url].items()
        }
    assert a.type_versions == b.type_versions


def test_assembled_route_table_equals_the_serialised_message() -> None:
    from meshgate.xds.gateway import egress_routes, egress_routes_encoded

    m = model("v1")
    assert egress_routes_encoded(m, {}).payload == egress_routes(m, {}).SerializeToString(
        deterministic=True
    )


def test_secrets_only_in_the_gateway_snapshot() -> None:
    import dataclasses

    from meshgate.policy.model import Credentials
    from meshgate.xds import types

    m = model("v1")
    dest = dataclasses.replace(m.destinations[0], credentials=Credentials("X-Key", "k", "{secret}"))
    m = dataclasses.replace(m, destinations=(dest, *m.destinations[1:]))
    snaps = build_snapshots(m, secrets={"k": "value-that-must-stay-on-gateways"})
    assert list(snaps["gateway"].of_type(types.SECRET)) == ["credential-alpha"]
    for group, snap in snaps.items():
        blob = b"".join(r.any_bytes for t in snap.resources.values() for r in t.values())
        assert (b"value-that-must-stay-on-gateways" in blob) == (group == "gateway"), group

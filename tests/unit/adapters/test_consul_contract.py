"""One contract, two Consul clients: py-consul against the in-test Consul API
(tests/consul_fake.py) and the in-memory twin. Each test body runs against both, so the twin
is proven to answer as the real client does."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol

import pytest
from consul_fake import FakeConsul, Instance, fake_consul

from meshgate.adapters.consul import (
    ACLPermissionDenied,
    ConsulClient,
    ConsulError,
    InMemoryConsul,
    PyConsulClient,
    ServiceRegistration,
    describe_error,
)
from meshgate.controlplane.consul import ConsulCatalog, WatchSettings, instances_of
from meshgate.policy.model import ConsulConfig, ConsulService, Destination, Mesh, PolicyModel
from meshgate.sidecar.consul_registration import ConsulRegistrar, Registration

TOKEN = "contract-token-2b9e"


class Controls(Protocol):
    """What a test does to the Consul behind the client."""

    def add(self, service: str, iid: str, port: int, tags: tuple[str, ...] = ()) -> None: ...
    def set_passing(self, service: str, iid: str, passing: bool) -> None: ...
    def fail(self, failing: bool) -> None: ...
    def registered(self) -> set[str]: ...


@dataclass
class HttpControls:
    fake: FakeConsul

    def add(self, service: str, iid: str, port: int, tags: tuple[str, ...] = ()) -> None:
        self.fake.set_instance(service, Instance(iid, port, tags=tags))

    def set_passing(self, service: str, iid: str, passing: bool) -> None:
        self.fake.set_passing(service, iid, passing)

    def fail(self, failing: bool) -> None:
        self.fake.set_failing(500 if failing else None)

    def registered(self) -> set[str]:
        return set(self.fake.registered)


@dataclass
class TwinControls:
    twin: InMemoryConsul

    def add(self, service: str, iid: str, port: int, tags: tuple[str, ...] = ()) -> None:
        self.twin.set_instance(service, iid, port, tags=tags)

    def set_passing(self, service: str, iid: str, passing: bool) -> None:
        self.twin.set_passing(service, iid, passing)

    def fail(self, failing: bool) -> None:
        self.twin.set_failing("500 rpc error: No cluster leader" if failing else None)

    def registered(self) -> set[str]:
        return set(self.twin.registered)


@pytest.fixture
def http_consul() -> Iterator[FakeConsul]:
    with fake_consul(token=TOKEN) as fake:
        yield fake


@pytest.fixture(params=["py-consul", "in-memory"])
async def consul(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[ConsulClient, Controls]]:
    if request.param == "py-consul":
        fake: FakeConsul = request.getfixturevalue("http_consul")
        config = ConsulConfig(fake.url, datacenter="dc1")
        client: ConsulClient = PyConsulClient(config, timeout=10, needed_by="test needs")
        controls: Controls = HttpControls(fake)
    else:
        twin = InMemoryConsul(token=TOKEN)
        client, controls = twin, TwinControls(twin)
    controls.add("inventory", "a", 8001)
    controls.add("inventory", "b", 8002, tags=("v2",))
    try:
        yield client, controls
    finally:
        await client.close()


async def test_health_filters_passing_and_tags(consul: tuple[ConsulClient, Controls]) -> None:
    client, controls = consul
    index, entries = await client.health_service("inventory", token=TOKEN)
    assert int(index) > 0
    assert instances_of(entries) == ((("127.0.0.1", 8001), ("127.0.0.1", 8002)), 0)
    _, tagged = await client.health_service("inventory", tag="v2", token=TOKEN)
    assert instances_of(tagged)[0] == (("127.0.0.1", 8002),)
    controls.set_passing("inventory", "a", False)
    _, passing = await client.health_service("inventory", token=TOKEN)
    assert instances_of(passing)[0] == (("127.0.0.1", 8002),)
    _, every = await client.health_service("inventory", passing=False, token=TOKEN)
    assert len(instances_of(every)[0]) == 2
    _, unknown = await client.health_service("nothing-here", token=TOKEN)
    assert unknown == []


async def test_blocking_query_waits_for_a_change_or_the_wait(
    consul: tuple[ConsulClient, Controls],
) -> None:
    client, controls = consul
    index, _ = await client.health_service("inventory", token=TOKEN)
    start = time.monotonic()
    same, _ = await client.health_service("inventory", index=index, wait=0.3, token=TOKEN)
    assert same == index and time.monotonic() - start >= 0.25  # nothing moved: held for `wait`
    query = asyncio.create_task(
        client.health_service("inventory", index=index, wait=10.0, token=TOKEN)
    )
    await asyncio.sleep(0.2)
    assert not query.done()  # blocked on the index
    start = time.monotonic()
    controls.add("inventory", "c", 8003)
    new, entries = await asyncio.wait_for(query, 5.0)
    assert time.monotonic() - start < 2.0  # answered on the change, not at the end of the wait
    assert int(new) > int(index) and len(entries) == 3


async def test_a_refused_token_and_a_failing_consul_are_errors(
    consul: tuple[ConsulClient, Controls],
) -> None:
    client, controls = consul
    with pytest.raises(ACLPermissionDenied):
        await client.health_service("inventory", token="wrong")
    with pytest.raises(ACLPermissionDenied):
        await client.health_service("inventory")
    index, _ = await client.health_service("inventory", token=TOKEN)
    query = asyncio.create_task(
        client.health_service("inventory", index=index, wait=10.0, token=TOKEN)
    )
    await asyncio.sleep(0.2)
    controls.fail(True)  # a blocked query fails at once too
    with pytest.raises(ConsulError) as err:
        await asyncio.wait_for(query, 5.0)
    assert "500" in str(err.value) and "No cluster leader" in str(err.value)
    with pytest.raises(ConsulError):
        await client.register(_registration(), token=TOKEN)
    controls.fail(False)
    assert (await client.health_service("inventory", token=TOKEN))[1]


async def test_register_and_deregister(consul: tuple[ConsulClient, Controls]) -> None:
    client, controls = consul
    with pytest.raises(ACLPermissionDenied):
        await client.register(_registration(), token="wrong")
    assert controls.registered() == set()
    await client.register(_registration(), token=TOKEN)
    assert controls.registered() == {"egress-1"}
    assert await client.deregister("egress-1", token=TOKEN) is True
    assert controls.registered() == set()
    assert await client.deregister("egress-1", token=TOKEN) is False  # unknown: no error


def _registration() -> ServiceRegistration:
    return ServiceRegistration(
        name="egress",
        service_id="egress-1",
        address="127.0.0.1",
        port=15001,
        check_url="http://127.0.0.1:9901/ready",
        tags=("meshgate",),
    )


def test_error_text_never_carries_the_token() -> None:
    message = describe_error(ConsulError(f"403 for\n  ?token={TOKEN}"), TOKEN)
    assert TOKEN not in message and "\n" not in message
    assert message == "ConsulError: 403 for ?token=<token>"


async def test_the_catalogue_watch_runs_on_the_twin() -> None:
    twin = InMemoryConsul(token=TOKEN)
    twin.set_instance("inventory", "a", 8001)
    changed = asyncio.Event()

    class Secrets:
        description = "test"

        def read(self, name: str) -> str | None:
            return TOKEN if name == "t" else None

    settings = WatchSettings(wait_seconds=2.0, backoff_base=0.05, backoff_max=0.2)
    catalog = ConsulCatalog(changed.set, settings, client_factory=lambda config: twin)
    dest = Destination("inv", "inventory.internal", 80, consul=ConsulService("inventory"))
    model = PolicyModel(Mesh(consul=ConsulConfig("http://consul:8500", "t")), (dest,), (), "v1")
    await catalog.configure(model, Secrets())
    try:
        await asyncio.wait_for(changed.wait(), 3.0)
        assert catalog.endpoints(model) == {"inv": (("127.0.0.1", 8001),)}
        changed.clear()
        twin.set_instance("inventory", "b", 8002)
        await asyncio.wait_for(changed.wait(), 3.0)
        assert catalog.endpoints(model) == {"inv": (("127.0.0.1", 8001), ("127.0.0.1", 8002))}
        twin.set_failing("500 no leader")
        await asyncio.sleep(0.3)
        assert catalog.endpoints(model)["inv"] == (("127.0.0.1", 8001), ("127.0.0.1", 8002))
        assert "no leader" in catalog.status_json()[0]["last_error"]
    finally:
        await catalog.close()


async def test_gateway_registration_runs_on_the_twin(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    twin = InMemoryConsul(token=TOKEN)
    twin.set_failing(f"500 no leader (token {TOKEN})")
    reg = Registration(
        "http://consul:8500", "egress-1", "egress", "10.0.0.1", 15001, "http://x/ready", TOKEN
    )
    registrar = ConsulRegistrar(reg, backoff_max=0.05, client_factory=lambda c: twin,
                                backoff_base=0.01)  # fmt: skip
    registrar.start()
    await asyncio.sleep(0.3)  # several retries while Consul fails
    assert twin.registered == {} and not registrar.registered
    twin.set_failing(None)
    await asyncio.wait_for(registrar.wait_registered(), 3.0)
    assert twin.registered["egress-1"] == reg.service_registration
    await registrar.stop()
    assert twin.registered == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "registering egress-1 failed" in warnings[0].getMessage()
    assert len([r for r in caplog.records if "registering egress-1" in r.getMessage()]) > 3
    assert TOKEN not in caplog.text

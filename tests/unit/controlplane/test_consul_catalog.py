"""The Consul catalogue watcher against an in-test Consul API (tests/consul_fake.py).

No Consul server can be installed on these machines, so the fake implements exactly the paths
the watcher uses (`/v1/health/service/<name>` with `passing`, `tag`, `dc`) with Consul's
blocking-query semantics: `X-Consul-Index` on every answer, and a request with `index`/`wait`
that blocks until the service's index moves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import free_port, write_test_pki
from consul_fake import FakeConsul, Instance, fake_consul

from meshgate.controlplane.consul import ConsulCatalog, WatchSettings, instances_of
from meshgate.policy.model import (
    ConsulConfig,
    ConsulService,
    Destination,
    Mesh,
    PolicyModel,
)

TOKEN = "s3cr3t-consul-token-6f1d"
FAST = WatchSettings(wait_seconds=2.0, backoff_base=0.05, backoff_max=0.2)


class Secrets:
    description = "test"

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def read(self, name: str) -> str | None:
        return self.values.get(name)


def policy(url: str, *services: ConsulService, token_secret: str | None = "consul-token"):  # type: ignore[no-untyped-def]
    dests = tuple(
        Destination(f"d-{s.service}-{s.tag or 'any'}", f"{s.service}.internal", 80, consul=s)
        for s in services
    )
    mesh = Mesh(consul=ConsulConfig(url, token_secret, "dc1"))
    return PolicyModel(mesh, dests, (), "v1")


@pytest.fixture
def consul() -> Iterator[FakeConsul]:
    with fake_consul(token=TOKEN) as c:
        c.set_instance("inventory", Instance("a", 8001))
        c.set_instance("inventory", Instance("b", 8002, tags=("v2",)))
        yield c


class Changes:
    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    async def next(self, timeout: float = 3.0) -> float:
        start = time.monotonic()
        await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()
        return time.monotonic() - start


INV = ConsulService("inventory")


async def test_healthy_instances_become_endpoints_and_changes_arrive_within_a_second(
    consul: FakeConsul,
) -> None:
    changes = Changes()
    catalog = ConsulCatalog(changes, FAST)
    model = policy(consul.url, INV, ConsulService("inventory", tag="v2"))
    await catalog.configure(model, Secrets({"consul-token": TOKEN}))
    try:
        await changes.next()
        await asyncio.sleep(0.2)
        assert catalog.endpoints(model) == {
            "d-inventory-any": (("127.0.0.1", 8001), ("127.0.0.1", 8002)),
            "d-inventory-v2": (("127.0.0.1", 8002),),
        }
        # the next queries block on the index Consul gave
        await asyncio.sleep(0.3)
        blocked = [r for r in consul.health_requests("inventory") if "index" in r.query]
        assert blocked and all(r.query["wait"] == ["2000ms"] for r in blocked)
        assert all(r.query["passing"] == ["1"] and r.query["dc"] == ["dc1"] for r in blocked)
        # an instance failing its checks leaves; the change is seen within a second
        changes.event.clear()
        consul.set_passing("inventory", "a", False)
        assert await changes.next() < 1.0
        assert catalog.endpoints(model)["d-inventory-any"] == (("127.0.0.1", 8002),)
        # one joining
        consul.set_instance("inventory", Instance("c", 8003, address="127.0.0.3"))
        assert await changes.next() < 1.0
        assert catalog.endpoints(model)["d-inventory-any"] == (
            ("127.0.0.1", 8002),
            ("127.0.0.3", 8003),
        )
        # one leaving the catalogue; the tag watch (only b) keeps its instances
        consul.remove_instance("inventory", "b")
        start = time.monotonic()
        expected = {"d-inventory-any": (("127.0.0.3", 8003),), "d-inventory-v2": ()}
        while catalog.endpoints(model) != expected:  # two watches, each answered on its own
            assert time.monotonic() - start < 1.0
            await asyncio.sleep(0.01)
        [any_, v2] = catalog.status_json()
        assert any_["instances"] == 1 and v2["instances"] == 0
        assert int(any_["index"]) == consul.service_index["inventory"]
        assert any_["last_error"] is None and any_["last_success_at"]
        # every request carried the token
        assert {r.token for r in consul.health_requests("inventory")} == {TOKEN}
    finally:
        await catalog.close()


async def test_passing_only_false_keeps_failing_instances(consul: FakeConsul) -> None:
    consul.set_passing("inventory", "a", False)
    changes = Changes()
    catalog = ConsulCatalog(changes, FAST)
    model = policy(consul.url, ConsulService("inventory", passing_only=False))
    await catalog.configure(model, Secrets({"consul-token": TOKEN}))
    try:
        await changes.next()
        assert len(catalog.endpoints(model)["d-inventory-any"]) == 2
        assert all("passing" not in r.query for r in consul.health_requests("inventory"))
    finally:
        await catalog.close()


async def test_errors_keep_last_instances_back_off_and_recover_without_token_leaks(
    consul: FakeConsul, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    changes = Changes()
    catalog = ConsulCatalog(changes, FAST)
    model = policy(consul.url, INV)
    await catalog.configure(model, Secrets({"consul-token": TOKEN}))
    try:
        await changes.next()
        known = catalog.endpoints(model)
        consul.set_failing(500)
        await asyncio.sleep(1.0)
        assert catalog.endpoints(model) == known  # last known instances keep serving
        [status] = catalog.status_json()
        assert "500" in status["last_error"] and "No cluster leader" in status["last_error"]
        assert status["instances"] == 2
        # backoff: a handful of retries in a second, not a hot loop
        failed = [r for r in consul.health_requests("inventory") if r.answered == 0.0]
        assert 2 <= len(failed) <= 15
        consul.set_failing(None)
        consul.remove_instance("inventory", "a")
        await changes.next(timeout=3.0)
        [status] = catalog.status_json()
        assert status["last_error"] is None and status["instances"] == 1
        assert "recovered" in caplog.text
        assert TOKEN not in caplog.text
        assert TOKEN not in json.dumps(catalog.status_json())
    finally:
        await catalog.close()


async def test_wrong_or_missing_token_is_an_error_never_echoed(
    consul: FakeConsul, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    catalog = ConsulCatalog(lambda: None, FAST)
    model = policy(consul.url, INV)
    await catalog.configure(model, Secrets({"consul-token": "not-the-token"}))
    await asyncio.sleep(0.5)
    [status] = catalog.status_json()
    assert "ACLPermissionDenied" in status["last_error"] and status["instances"] is None
    assert catalog.endpoints(model) == {}
    await catalog.configure(model, Secrets({}))  # provider changed? same description: same key
    await catalog.close()
    missing = ConsulCatalog(lambda: None, FAST)
    await missing.configure(model, Secrets({}))
    await asyncio.sleep(0.3)
    [status] = missing.status_json()
    assert "token secret 'consul-token' not found" in status["last_error"]
    await missing.close()
    assert "not-the-token" not in caplog.text


async def test_unreachable_consul_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    catalog = ConsulCatalog(lambda: None, FAST)
    model = policy(f"http://127.0.0.1:{free_port()}", INV, token_secret=None)
    await catalog.configure(model, Secrets({}))
    await asyncio.sleep(0.5)
    [status] = catalog.status_json()
    assert status["last_error"] and status["instances"] is None and status["index"] is None
    assert "keeping its last known instances" in caplog.text
    await catalog.close()


async def test_policy_changes_start_and_stop_watches_and_keep_unchanged_ones(
    consul: FakeConsul,
) -> None:
    consul.set_instance("billing", Instance("x", 9001))
    changes = Changes()
    catalog = ConsulCatalog(changes, FAST)
    secrets = Secrets({"consul-token": TOKEN})
    first = policy(consul.url, INV)
    await catalog.configure(first, secrets)
    try:
        await changes.next()
        task = catalog._tasks[INV]
        before = len(consul.health_requests("inventory"))
        second = policy(consul.url, INV, ConsulService("billing"))
        await catalog.configure(second, secrets)
        await changes.next()
        assert catalog._tasks[INV] is task  # the unchanged watch kept going, index and all
        assert catalog.endpoints(second)["d-billing-any"] == (("127.0.0.1", 9001),)
        # no extra non-blocking query was made for the unchanged service
        fresh = [r for r in consul.health_requests("inventory")[before:] if "index" not in r.query]
        assert fresh == []
        third = policy(consul.url, ConsulService("billing"))
        await catalog.configure(third, secrets)
        assert task.done()
        assert [s["service"] for s in catalog.status_json()] == ["billing"]
    finally:
        await catalog.close()


def test_instances_use_the_service_address_then_the_node_address() -> None:
    entries = [
        {"Node": {"Address": "10.0.0.1"}, "Service": {"Address": "", "Port": 80}},
        {"Node": {"Address": "10.0.0.1"}, "Service": {"Address": "10.0.0.9", "Port": 81}},
        {"Node": {"Address": "10.0.0.1"}, "Service": {"Address": "db.internal", "Port": 82}},
        {"Node": {"Address": "10.0.0.2"}, "Service": {"Address": "", "Port": 80}},
        {"Node": {"Address": "10.0.0.2"}, "Service": {"Address": "", "Port": 80}},
    ]
    assert instances_of(entries) == (
        (("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.9", 81)),
        1,  # a host name: EDS needs IP addresses
    )
    assert instances_of(None) == ((), 0)


async def test_missing_py_consul_is_reported_in_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "consul.aio", None)  # as if the extra were not installed
    catalog = ConsulCatalog(lambda: None, FAST)
    await catalog.configure(policy("http://127.0.0.1:8500", INV), Secrets({}))
    [status] = catalog.status_json()
    assert status["last_error"] == "consul destinations need: pip install 'meshgate[consul]'"
    await catalog.close()


async def test_https_consul_verified_with_the_ca_file(tmp_path: Path) -> None:
    ca, cert, key = write_test_pki(tmp_path, ["localhost"], "consul")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    with fake_consul(token=TOKEN, tls=tls) as consul:
        consul.set_instance("inventory", Instance("a", 8001))
        changes = Changes()
        trusted = ConsulCatalog(changes, FAST)
        model = policy(consul.url, INV)
        mesh = dataclasses.replace(
            model.mesh, consul=ConsulConfig(consul.url, "t", ca_file=str(ca))
        )
        good = dataclasses.replace(model, mesh=mesh)
        await trusted.configure(good, Secrets({"t": TOKEN}))
        try:
            await changes.next()
            assert trusted.endpoints(good) == {"d-inventory-any": (("127.0.0.1", 8001),)}
        finally:
            await trusted.close()
        # without the CA the certificate is refused: an error, never an unverified answer
        untrusted = ConsulCatalog(lambda: None, FAST)
        await untrusted.configure(policy(consul.url, INV), Secrets({"consul-token": TOKEN}))
        await asyncio.sleep(0.5)
        [status] = untrusted.status_json()
        assert "certificate verify failed" in status["last_error"].lower()
        assert status["instances"] is None
        await untrusted.close()

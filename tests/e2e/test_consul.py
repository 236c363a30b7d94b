"""Consul-backed destinations end to end: real Envoy sidecar and gateway, two real upstreams on
loopback, and an in-test Consul API (tests/consul_fake.py).

No Consul server can be installed on these machines, so the fake implements exactly the Consul
paths meshgate uses (`/v1/health/service/<name>`, agent service register/deregister) with
Consul's blocking-query semantics (`X-Consul-Index`, `index`/`wait`, a request that blocks
until the index moves) and ACL tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from builders import admin_auth, free_port
from consul_fake import Instance, fake_consul
from harness import AGENT, MESH, control_plane, gateway, sidecar, until, upstream

from meshgate.controlplane.server import ControlPlane
from meshgate.sidecar.envoy_process import EnvoyProcess

pytestmark = pytest.mark.e2e

TOKEN = "consul-acl-7c2e9b41-token"
CLUSTER = "dest-inventory"

DEST = """\
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: inventory}
spec:
  host: inventory.internal
  port: 80
  tls: none
  consul: {service: inventory}
"""


def write_consul_policy(directory: Path, listen: int, consul_url: str) -> None:
    (directory / "secrets").mkdir(parents=True)
    (directory / "secrets" / "consul-token").write_text(TOKEN + "\n")
    mesh = MESH.format(port=listen) + (
        "  secrets: {provider: file, path: ./secrets}\n"
        f"  consul: {{address: '{consul_url}', tokenSecret: consul-token, datacenter: dc1}}\n"
    )
    (directory / "mesh.yaml").write_text(mesh)
    (directory / "dest.yaml").write_text(DEST)
    agent = AGENT.format(agent="researcher", rules="    - destination: inventory")
    (directory / "agents.yaml").write_text(agent)


async def stats(envoy: EnvoyProcess) -> dict[str, int]:
    text = (await envoy.admin.arequest("GET", "/stats")).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            out[name] = int(value)
    return out


def config_pushes(s: dict[str, int]) -> dict[str, int]:
    """Envoy's counters of accepted CDS, LDS and RDS updates."""
    return {
        k: v
        for k, v in s.items()
        if k
        in (
            "cluster_manager.cds.update_success",
            "listener_manager.lds.update_success",
            "http.egress.rds.egress-routes.update_success",
        )
    }


async def spread(client: httpx.AsyncClient, n: int) -> tuple[list[int], dict[str, int]]:
    """`n` requests through the sidecar: their statuses and which upstream answered."""
    statuses: list[int] = []
    seen: dict[str, int] = {}
    for _ in range(n):
        r = await client.get("http://inventory.internal/items")
        statuses.append(r.status_code)
        if r.status_code == 200:
            who = r.json()["upstream"]
            seen[who] = seen.get(who, 0) + 1
    return statuses, seen


async def only_one_answers(client: httpx.AsyncClient, who: str, timeout: float = 5.0) -> float:
    """Send requests until 10 in a row come from `who`; every one must be a 200."""
    start = time.monotonic()
    streak = 0
    while streak < 10:
        assert time.monotonic() - start < timeout, f"traffic did not move to {who}"
        r = await client.get("http://inventory.internal/items")
        assert r.status_code == 200, r.text  # no 5xx for requests started after the change
        streak = streak + 1 if r.json()["upstream"] == who else 0
    return time.monotonic() - start


def consul_status(cp: ControlPlane) -> dict[str, object]:
    [status] = cp.consul.status_json()
    return status


async def test_gateway_follows_the_consul_catalogue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    listen = free_port()
    policy = tmp_path / "policies"
    with fake_consul(token=TOKEN) as consul:
        async with upstream("inv-a") as a, upstream("inv-b") as b:
            consul.set_instance("inventory", Instance("a", a.port))
            consul.set_instance("inventory", Instance("b", b.port))
            write_consul_policy(policy, listen, consul.url)
            async with (
                control_plane(policy, tmp_path / "state") as cp,
                gateway(cp, tmp_path) as gw,
                sidecar(cp, tmp_path, "researcher") as proxy,
                httpx.AsyncClient(proxy=proxy, timeout=10) as client,
            ):
                await until(lambda: consul_status(cp)["instances"] == 2, what="2 instances")
                await until(lambda: _cla_size(gw, 2), timeout=10, what="Envoy has both instances")
                # traffic from the agent through sidecar and gateway reaches both instances
                statuses, seen = await spread(client, 20)
                assert set(statuses) == {200}
                assert set(seen) == {"inv-a", "inv-b"}

                # removing one from the catalogue: an EDS push only, traffic moves to the other
                before = await stats(gw)
                consul.remove_instance("inventory", "a")
                removed = time.monotonic()
                eds = f"cluster.{CLUSTER}.update_success"
                await until(
                    _stat_above(gw, eds, before[eds]), timeout=3, what="EDS update in Envoy"
                )
                eds_latency = time.monotonic() - removed
                await only_one_answers(client, "inv-b")
                after = await stats(gw)
                assert config_pushes(after) == config_pushes(before)  # no CDS, LDS, RDS push
                print(f"EDS push applied by Envoy {eds_latency:.3f}s after the catalogue change")
                assert eds_latency < 1.5, eds_latency

                # failing its checks moves traffic too (passingOnly defaults to true)
                consul.set_instance("inventory", Instance("a", a.port))
                await until(lambda: consul_status(cp)["instances"] == 2, what="a is back")
                consul.set_passing("inventory", "b", False)
                await only_one_answers(client, "inv-a")

                # the catalogue failing: traffic keeps flowing to the last known instance
                consul.set_failing(500)
                await until(lambda: consul_status(cp)["last_error"], what="error recorded")
                statuses, seen = await spread(client, 10)
                assert set(statuses) == {200} and set(seen) == {"inv-a"}
                status = await _admin_status(cp)
                [svc] = status["consul"]
                assert svc["service"] == "inventory" and svc["instances"] == 1
                assert "500" in svc["last_error"] and svc["index"]
                table = await _cli_status(cp)
                assert "inventory" in table and "consul error" in table
                assert TOKEN not in json.dumps(status) and TOKEN not in table

                # recovery needs no restart
                consul.set_failing(None)
                consul.set_passing("inventory", "b", True)
                await until(lambda: consul_status(cp)["instances"] == 2, what="recovered")
                assert consul_status(cp)["last_error"] is None
                await until(lambda: _cla_size(gw, 2), what="Envoy has both again")
                statuses, seen = await spread(client, 20)
                assert set(statuses) == {200} and set(seen) == {"inv-a", "inv-b"}

                # zero healthy instances: Envoy answers 503 upstream_error, status shows 0
                consul.set_passing("inventory", "a", False)
                consul.set_passing("inventory", "b", False)
                await until(lambda: consul_status(cp)["instances"] == 0, what="none healthy")
                await until(lambda: _cla_size(gw, 0), what="Envoy has none")
                r = await client.get("http://inventory.internal/items")
                assert r.status_code == 503
                assert r.json()["error"] == "upstream_error"

    # every request to Consul carried the token; no log line shows it
    requests = consul.health_requests("inventory")
    assert requests and {r.token for r in requests} == {TOKEN}
    assert any("index" in r.query and "wait" in r.query for r in requests)
    assert TOKEN not in caplog.text


async def _cla_size(gw: EnvoyProcess, n: int) -> bool:
    text = (await gw.admin.arequest("GET", "/clusters")).text
    hosts = set(re.findall(rf"^{CLUSTER}::([0-9.]+:[0-9]+)::cx_active", text, re.M))
    return len(hosts) == n


def _stat_above(gw: EnvoyProcess, name: str, value: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return (await stats(gw)).get(name, 0) > value

    return check


async def _admin_status(cp: ControlPlane) -> dict[str, object]:
    async with httpx.AsyncClient(headers=admin_auth(cp)) as client:
        data: dict[str, object] = (await client.get(f"http://{cp.admin_address}/status")).json()
        return data


async def _cli_status(cp: ControlPlane) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshgate.cli",
        "status",
        "--admin",
        f"http://{cp.admin_address}",
        "--state-dir",
        str(cp.state_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    return out.decode()


def test_gateway_registers_itself_and_deregisters_on_a_clean_stop(tmp_path: Path) -> None:
    token_file = tmp_path / "consul-token"
    token_file.write_text(TOKEN + "\n")
    health = free_port()
    with fake_consul(token=TOKEN) as consul:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshgate.cli",
                "gateway",
                "--control-plane",
                f"127.0.0.1:{free_port()}",  # nothing there: registration does not need xDS
                "--name",
                "edge-1",
                "--health-port",
                str(health),
                "--state-dir",
                str(tmp_path / "state"),
                "--insecure",  # no control plane here, so nothing to verify
                "--register-consul",
                consul.url,
                "--consul-token-file",
                str(token_file),
                "--advertise",
                "10.1.2.3:15001",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _wait_for(lambda: "meshgate-egress-edge-1" in consul.registered, proc)
            body = consul.registered["meshgate-egress-edge-1"]
            assert body["name"] == "meshgate-egress"
            assert (body["address"], body["port"]) == ("10.1.2.3", 15001)
            assert body["meta"] == {"meshgate_node": "gateway/edge-1"}
            [check] = body["checks"]
            assert check["http"] == f"http://127.0.0.1:{health}/healthz/ready"
            assert check["DeregisterCriticalServiceAfter"] == "1m"
            proc.terminate()  # SIGTERM: a clean stop
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, out
        assert consul.registered == {}
        puts = [r for r in consul.requests if r.method == "PUT"]
        assert [r.path for r in puts] == [
            "/v1/agent/service/register",
            "/v1/agent/service/deregister/meshgate-egress-edge-1",
        ]
        assert {r.token for r in puts} == {TOKEN}
        assert TOKEN not in out


def _wait_for(check, proc: subprocess.Popen[str], timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {proc.communicate()[0]}")
        assert time.monotonic() < deadline, "gateway never registered"
        time.sleep(0.1)


def test_registration_retries_while_consul_is_down(tmp_path: Path) -> None:
    """A Consul answering errors at start does not stop the gateway; it registers later."""
    health = free_port()
    with fake_consul() as consul:
        consul.set_failing(500)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshgate.cli",
                "gateway",
                "--control-plane",
                f"127.0.0.1:{free_port()}",
                "--health-port",
                str(health),
                "--state-dir",
                str(tmp_path / "state"),
                "--insecure",  # no control plane here, so nothing to verify
                "--register-consul",
                consul.url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _wait_for(lambda: any(r.method == "PUT" for r in consul.requests), proc)
            consul.set_failing(None)
            _wait_for(lambda: "meshgate-egress-local" in consul.registered, proc)
            proc.terminate()
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, out
        assert "registering meshgate-egress-local failed" in out
        assert consul.registered == {}


def test_bad_register_consul_address_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshgate.cli",
            "gateway",
            "--register-consul",
            "consul:8500",
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: --register-consul 'consul:8500': must start with http:// or https://, like "
        "http://127.0.0.1:8500"
    ]


def test_register_consul_needs_a_health_port(tmp_path: Path) -> None:
    """Consul's HTTP check gets the health listener: Envoy's admin is a unix socket."""
    res = subprocess.run(
        [
            sys.executable, "-m", "meshgate.cli", "gateway", "--register-consul",
            "http://127.0.0.1:8500", "--state-dir", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: --register-consul needs --health-port (Consul's HTTP check)"
    ]


def test_validate_reports_consul_mistakes_at_file_line(tmp_path: Path) -> None:
    policy = tmp_path / "policies"
    write_consul_policy(policy, 15001, "http://127.0.0.1:8500")
    (policy / "dest.yaml").write_text(DEST + "  address: 127.0.0.1:9000\n")
    mesh = (policy / "mesh.yaml").read_text().replace("address: 'http://", "address: 'tcp://")
    (policy / "mesh.yaml").write_text(mesh)
    res = subprocess.run(
        [sys.executable, "-m", "meshgate.cli", "validate", str(policy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"{policy}/dest.yaml:9:3: a destination has either address or consul, not both "
        "(consul finds the instances the address would name)",
        f'{policy}/mesh.yaml:8:21: consul.address "tcp://127.0.0.1:8500": must start with '
        "http:// or https://, like http://127.0.0.1:8500",
        f"2 problems in {policy}",
    ]


async def test_control_plane_follows_policy_and_catalogue_changes(tmp_path: Path) -> None:
    """Without Envoy: what the control plane serves as the catalogue and the policy change."""
    from meshgate.xds import types
    from meshgate.xds.nodes import GATEWAY_GROUP

    policy = tmp_path / "policies"
    with fake_consul(token=TOKEN) as consul:
        consul.set_instance("inventory", Instance("a", 9101))
        write_consul_policy(policy, free_port(), consul.url)
        async with control_plane(policy, tmp_path / "state") as cp:
            await until(lambda: consul_status(cp)["instances"] == 1, what="first answer")

            def gateway_versions() -> dict[str, str]:
                snap = cp.cache.get(GATEWAY_GROUP)
                assert snap is not None
                return dict(snap.type_versions)

            await until(lambda: _eds_size(cp) == 1, what="instance in the snapshot")
            before = gateway_versions()
            consul.set_instance("inventory", Instance("b", 9102))
            await until(lambda: _eds_size(cp) == 2, timeout=1.0, what="EDS within a second")
            after = gateway_versions()
            changed = {t for t in before if before[t] != after[t]}
            assert changed == {types.ENDPOINT}
            # a policy edit that drops the destination stops its watch; the status says so
            watch = cp.consul._tasks[next(iter(cp.consul._tasks))]
            (policy / "dest.yaml").write_text(
                DEST.replace("consul: {service: inventory}", "address: 127.0.0.1:9101")
            )
            await until(lambda: cp.consul.status_json() == [], what="watch stopped")
            assert watch.done()


def _eds_size(cp: ControlPlane) -> int:
    from envoy.config.endpoint.v3 import endpoint_pb2
    from google.protobuf import any_pb2

    from meshgate.xds import types
    from meshgate.xds.nodes import GATEWAY_GROUP

    snap = cp.cache.get(GATEWAY_GROUP)
    if snap is None or CLUSTER not in snap.of_type(types.ENDPOINT):
        return -1
    packed = any_pb2.Any()
    packed.ParseFromString(snap.of_type(types.ENDPOINT)[CLUSTER].any_bytes)
    cla = endpoint_pb2.ClusterLoadAssignment()
    cla.ParseFromString(packed.value)
    return sum(len(loc.lb_endpoints) for loc in cla.endpoints)

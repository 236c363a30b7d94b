"""`meshgate gateway --metrics-address IP:PORT`: the pacer's metrics on the one address given
(a pod IP for Prometheus), loopback otherwise; a bad address is a usage error at parse time."""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from meshgate.cli import app
from meshgate.cli.gateway import PacedGateway
from meshgate.pacer.service import Pacer
from meshgate.pacing.memory_store import MemoryStore


def parse(*args: str) -> dict[str, Any]:
    cmd: Any = typer.main.get_command(app)
    gw = cmd.commands["gateway"]
    params: dict[str, Any] = gw.make_context("gateway", list(args)).params
    return params


@pytest.mark.parametrize("value", ["10.1.2.3:15090", "0.0.0.0:15090", "[fd00::7]:15090"])
def test_ip_and_port_parse(value: str) -> None:
    assert parse("--metrics-address", value)["metrics_address"] == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("prometheus.example:15090", "must be an IP address"),  # a name may resolve anywhere
        ("10.1.2.3", "host:port"),
        ("10.1.2.3:0", "between 1 and 65535"),
        ("fd00::7:15090", "\\[addr\\]:port"),  # ambiguous without brackets
        ("$(MESHGATE_POD_IP):15090", "host part"),  # an unexpanded manifest variable
    ],
)
def test_a_bad_address_is_refused_when_parsing(value: str, why: str) -> None:
    with pytest.raises(typer.BadParameter, match=why):
        parse("--metrics-address", value)


def test_the_default_is_no_metrics_listener() -> None:
    params = parse()
    assert params["metrics_address"] is None and params["metrics_port"] is None


class FakeGateway:
    def __init__(self, workdir: Path) -> None:
        self.admin = SimpleNamespace(socket=workdir / "admin.sock")

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)
    return False


async def test_metrics_listen_on_the_given_address_only(tmp_path: Path) -> None:
    """127.0.0.2 is loopback on Linux but a different address: 127.0.0.1 must not answer,
    as a gateway bound to its pod IP must not answer on the others."""
    pacer = Pacer(tmp_path / "pacer.sock", MemoryStore)
    paced = PacedGateway(FakeGateway(tmp_path), pacer, 0, "127.0.0.2")
    await paced.start()
    try:
        port = paced.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as r:
            assert b"meshgate_gateway_capacity_waiting 0.0" in r.read()
        assert refused(f"http://127.0.0.1:{port}/metrics")
    finally:
        await paced.stop()
    assert refused(f"http://127.0.0.2:{port}/metrics")


@pytest.fixture
def keep_umask() -> Iterator[None]:
    """`run_until_signal` sets the process umask; the test process keeps its own."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


class Started(Exception):
    pass


def run_gateway(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Any, dict[str, Any]]:
    seen: dict[str, Any] = {}

    async def fake_start_gateway(*a: Any, **kw: Any) -> Any:
        seen.update(kw)
        raise Started  # Envoy is not what is tested here

    # the module, not the `gateway` command function meshgate.cli re-exports under its name
    monkeypatch.setattr(sys.modules["meshgate.cli.gateway"], "start_gateway", fake_start_gateway)
    result = CliRunner().invoke(app, ["gateway", *args])
    return result, seen


@pytest.mark.usefixtures("keep_umask")
def test_the_address_reaches_the_metrics_server(monkeypatch: pytest.MonkeyPatch) -> None:
    result, seen = run_gateway(monkeypatch, "--metrics-address", "[fd00::7]:15090")
    assert isinstance(result.exception, Started)
    assert (seen["metrics_host"], seen["metrics_port"]) == ("fd00::7", 15090)
    result, seen = run_gateway(monkeypatch, "--metrics-port", "9464")
    assert isinstance(result.exception, Started)
    assert (seen["metrics_host"], seen["metrics_port"]) == ("127.0.0.1", 9464)


@pytest.mark.usefixtures("keep_umask")
def test_port_and_address_together_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("--metrics-port", "9464", "--metrics-address", "10.1.2.3:15090")
    result, seen = run_gateway(monkeypatch, *args)
    assert result.exit_code != 0 and not seen
    assert "not both" in result.output


def test_an_ipv6_address_binds(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 loopback")
    pacer = Pacer(tmp_path / "pacer.sock", MemoryStore)
    pacer.start()
    try:
        port = pacer.serve_metrics(0, "::1")
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as r:
            assert r.status == 200
        assert refused(f"http://127.0.0.1:{port}/metrics")
    finally:
        pacer.stop()

"""`meshgate gateway` runs its pacer: started before Envoy, stopped after, on the socket the
bootstrap names, with the store `--limit-store` chooses and metrics on a loopback port."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer

from meshgate.cli.gateway import PacedGateway, _pacer
from meshgate.errors import ConfigError
from meshgate.pacer import stores
from meshgate.pacer.service import Pacer
from meshgate.pacing.memory_store import MemoryStore


class FakeGateway:
    """What PacedGateway needs of launcher.GatewayProcess."""

    def __init__(self, workdir: Path, fail: bool = False) -> None:
        self.admin = SimpleNamespace(socket=workdir / "admin.sock")
        self.shipper = SimpleNamespace(ca_file=None, refresh_metadata=None)
        self.envoy = SimpleNamespace(xds_metadata=(("authorization", "Bearer t"),))
        self.fail = fail
        self.events: list[str] = []

    async def start(self) -> None:
        self.events.append("start")
        if self.fail:
            raise RuntimeError("envoy would not start")

    async def wait_ready(self, timeout: float) -> None:
        pass

    async def wait(self) -> int:
        return 0

    async def stop(self) -> None:
        self.events.append("stop")


def test_the_pacer_listens_beside_the_admin_socket(tmp_path: Path) -> None:
    gw = FakeGateway(tmp_path)
    pacer = _pacer(gw, "127.0.0.1:18000", None, None)
    assert pacer.socket == tmp_path / "pacer.sock"


def test_a_limit_store_must_be_redis(tmp_path: Path) -> None:
    with pytest.raises(typer.Exit):
        _pacer(FakeGateway(tmp_path), "127.0.0.1:18000", "http://redis:6379", None)


def test_store_choice() -> None:
    redis = stores.store_factory(
        "redis://127.0.0.1:1/0", password_file=None, control_plane="x:1", ca_file=None, metadata=()
    )
    remote = stores.store_factory(
        None, password_file=None, control_plane="127.0.0.1:1", ca_file=None, metadata=()
    )
    assert redis.__name__ == "redis" and remote.__name__ == "remote"


async def test_paced_gateway_starts_and_stops_its_pacer_with_metrics(tmp_path: Path) -> None:
    gw = FakeGateway(tmp_path)
    pacer = Pacer(tmp_path / "pacer.sock", MemoryStore)
    paced = PacedGateway(gw, pacer, 0)
    await paced.start()
    try:
        assert pacer.socket.exists() and gw.events == ["start"]
        port: Any = paced.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"meshgate_gateway_capacity_waiting 0.0" in r.read()
    finally:
        await paced.stop()
    assert gw.events == ["start", "stop"] and not pacer.socket.exists()


async def test_a_gateway_that_fails_to_start_stops_its_pacer(tmp_path: Path) -> None:
    pacer = Pacer(tmp_path / "pacer.sock", MemoryStore)
    with pytest.raises(RuntimeError):
        await PacedGateway(FakeGateway(tmp_path, fail=True), pacer, None).start()
    assert not pacer.socket.exists()


def test_the_pacer_refuses_a_directory_others_can_enter(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    pacer = Pacer(shared / "pacer.sock", MemoryStore)
    with pytest.raises(ConfigError, match="private directory"):
        pacer.start()
    assert not (shared / "pacer.sock").exists()

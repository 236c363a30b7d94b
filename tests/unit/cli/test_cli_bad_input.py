"""Bad input a new user gives the CLI: one line saying what and where, nothing written or left
running that the user did not ask for (found by following the docs literally)."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from meshgate.cli import app
from meshgate.errors import EnvoyError

runner = CliRunner()
# the module: `meshgate.cli.gateway` as an attribute is the command function of that name
gateway = importlib.import_module("meshgate.cli.gateway")


def test_up_stops_the_gateway_it_started_when_envoy_never_gets_ready(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `up` on a policy the control plane refused: Envoy never gets ready, and `up` only stops
    # a gateway start_gateway returned, so Envoy and the pacer must be stopped here
    events: list[str] = []

    class FakeGateway:
        admin = None

        async def start(self) -> None:
            events.append("envoy started")

        async def wait_ready(self, timeout: float = 30.0) -> None:
            raise EnvoyError("envoy was not ready within 30s")

        async def stop(self) -> None:
            events.append("envoy stopped")

    class FakePacer:
        def start(self) -> None:
            events.append("pacer started")

        def stop(self) -> None:
            events.append("pacer stopped")

    import meshgate.sidecar.launcher as launcher

    monkeypatch.setattr(launcher, "prepare_gateway", lambda *a, **k: FakeGateway())
    monkeypatch.setattr(gateway, "_pacer", lambda *a: FakePacer())

    async def start() -> Any:
        return await gateway.start_gateway("127.0.0.1:1", "local", tmp_path, False, 1, True)

    with pytest.raises(EnvoyError):
        asyncio.run(start())
    assert events == ["pacer started", "envoy started", "envoy stopped", "pacer stopped"]

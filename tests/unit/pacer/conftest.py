"""A running pacer (own thread and loop, as in the gateway) on a unix socket, with twins."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from pacer_twins import FlakyStore

from meshgate.pacer.ext_proc import PacerSettings
from meshgate.pacer.service import Pacer


@pytest.fixture
def store() -> FlakyStore:
    return FlakyStore()


@pytest.fixture
def pacer(tmp_path: Path, store: FlakyStore) -> Iterator[Pacer]:
    p = Pacer(
        tmp_path / "pacer.sock",
        lambda: store,
        PacerSettings(store_timeout_s=0.2, reservation_ttl_s=60, timeout_margin_s=2),
    )
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
async def channel(pacer: Pacer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"unix:{pacer.socket}") as ch:
        yield ch

"""A stream's inbox: FIFO, a reader waits for the next item, a cancelled wait loses nothing."""

from __future__ import annotations

import asyncio

import pytest

from meshgate.controlplane.streams import Mailbox


async def test_fifo_and_waiting_reader() -> None:
    box = Mailbox()
    box.put_nowait("a")
    box.put_nowait("b")
    assert [await box.get(), await box.get()] == ["a", "b"]
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    assert not reader.done()
    box.put_nowait("c")
    assert await asyncio.wait_for(reader, 1.0) == "c"


async def test_cancelled_wait_keeps_later_items() -> None:
    box = Mailbox()
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    box.put_nowait("d")
    assert await asyncio.wait_for(box.get(), 1.0) == "d"

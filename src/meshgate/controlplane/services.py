"""What a control-plane service is, and the background tasks most services run.

A service is constructed with its dependencies (narrow `Protocol`s, never the `ControlPlane`),
binds or opens what it needs in `start()`, and releases it in `stop()`. `ControlPlane` starts
services in dependency order and stops them in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, Protocol


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class BackgroundTasks:
    """The loops a service runs while started; `stop()` cancels and awaits them all."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

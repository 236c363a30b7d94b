"""Coalesce bursts of changes into one push (the two-stage debounce Istio uses).

A push happens once no new change has arrived for `quiet` seconds, or `max_delay` seconds after
the first change of a burst, whichever is sooner; only the newest value is pushed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Debouncer(Generic[T]):
    def __init__(
        self, push: Callable[[T], Awaitable[None]], quiet: float = 0.1, max_delay: float = 1.0
    ) -> None:
        self._push = push
        self._quiet = quiet
        self._max_delay = max_delay
        self._latest: T | None = None
        self._has_value = False
        self._changed = asyncio.Event()
        self.pushes = 0

    def submit(self, value: T) -> None:
        self._latest = value
        self._has_value = True
        self._changed.set()

    async def run(self) -> None:
        """Loop forever: wait for a change, let the burst settle, push the newest value."""
        loop = asyncio.get_running_loop()
        while True:
            await self._changed.wait()
            first = loop.time()
            while True:
                self._changed.clear()
                remaining = min(self._quiet, first + self._max_delay - loop.time())
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
            if self._has_value:
                value = self._latest
                self._has_value = False
                self._latest = None
                self.pushes += 1
                await self._push(value)  # type: ignore[arg-type]

"""Delegation in the control plane: the registry as a runtime input, and its endpoint.

Only with mTLS: the endpoint learns who calls from the gateway's verified client certificate,
which exists only then (without it, an identity header proves nothing).

The registry's store is opened in `start()`, in a worker thread (PostgreSQL may take seconds to
answer), so a bad `--delegation-store` fails the start in one line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from meshgate.delegation.expand import Service, SubAgent
from meshgate.delegation.registry import DelegationRegistry
from meshgate.delegation.service import DelegationServer
from meshgate.delegation.stores import open_store
from meshgate.identity.tokens import TokenAuthority
from meshgate.policy.model import PolicyModel


class Delegation:
    """`DelegationSource` for `RuntimeInputs`, and the service the control plane starts.

    `registry`, `server` and `key` exist once started."""

    registry: DelegationRegistry
    server: DelegationServer
    key: str

    def __init__(
        self,
        state_dir: Path,
        served: Callable[[], PolicyModel | None],
        tokens: TokenAuthority | None,
        poke: Callable[[], None],
        host: str,
        port: int,
        advertise: tuple[str, int] | None = None,
        clock: Callable[[], float] = time.time,
        store: str = "",
    ) -> None:
        """`store`: `stores.open_store`'s target ("" for `<state_dir>/delegation`)."""
        self._state_dir = state_dir
        self._store = store
        self._served = served
        self._tokens = tokens
        self._poke = poke
        self._clock = clock
        self.host, self.port = host, port
        self._advertise = advertise
        self._started = False

    def current(self, model: PolicyModel) -> tuple[SubAgent, ...]:
        if not self._started:
            return ()
        return self.registry.current(model)

    def sub_agents(self) -> list[SubAgent]:
        """As the last read saw them (no I/O); none before start."""
        return self.registry.all() if self._started else []

    def address(self) -> str:
        """Where the endpoint listens (the bound port once started)."""
        if self._started:
            return f"{self.server.host}:{self.server.port}"
        return f"{self.host}:{self.port}"

    def service(self) -> Service | None:
        """Where gateways reach the endpoint, once it listens."""
        if not self._started:
            return None
        host = self.server.host
        if host in ("", "0.0.0.0", "::"):  # listening everywhere: gateways on this host
            host = "127.0.0.1"
        return Service(self._advertise or (host, self.server.port))

    async def start(self) -> None:
        def open_registry() -> DelegationRegistry:
            return DelegationRegistry(open_store(self._store, self._state_dir), self._clock)

        registry = await asyncio.to_thread(open_registry)
        server = DelegationServer(
            registry, self._served, self._tokens, self._poke, self.host, self.port
        )
        try:
            await server.start()
        except BaseException:
            await asyncio.to_thread(registry.store.close)
            raise
        self.registry, self.server, self.key = registry, server, registry.key
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await self.server.stop()
        await asyncio.to_thread(self.registry.store.close)

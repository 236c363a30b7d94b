"""Delegation in the control plane: the registry as a runtime input, and its endpoint.

Only with mTLS: the endpoint learns who calls from the gateway's verified client certificate,
which exists only then (without it, an identity header proves nothing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from meshgate.delegation.expand import Service, SubAgent
from meshgate.delegation.registry import DelegationRegistry
from meshgate.delegation.service import DelegationServer
from meshgate.identity.tokens import TokenAuthority
from meshgate.policy.model import PolicyModel


class Delegation:
    """`DelegationSource` for `RuntimeInputs`, and the service the control plane starts."""

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
    ) -> None:
        self.registry = DelegationRegistry(state_dir, clock)
        self.key = self.registry.key
        self.server = DelegationServer(self.registry, served, tokens, poke, host, port)
        self._advertise = advertise
        self._started = False

    def current(self, model: PolicyModel) -> tuple[SubAgent, ...]:
        return self.registry.current(model)

    def service(self) -> Service | None:
        """Where gateways reach the endpoint, once it listens."""
        if not self._started:
            return None
        host = self.server.host
        if host in ("", "0.0.0.0", "::"):  # listening everywhere: gateways on this host
            host = "127.0.0.1"
        return Service(self._advertise or (host, self.server.port))

    async def start(self) -> None:
        await self.server.start()
        self._started = True

    async def stop(self) -> None:
        self._started = False
        await self.server.stop()

"""Runtime inputs: what snapshots need besides policy, and the loops that notice they changed.

Secret values (`secrets.py`), workload certificates and tool JWTs (`identity.py`, mTLS only) are
re-read every `interval` in a worker thread: providers may call Vault, renewal may call Vault
and generates keys, and none of that may run on the event loop that serves xDS. Consul
instances arrive from the catalogue's watches (`consul.py`). Each change goes to an
`InputsConsumer` (the snapshot publisher), which rebuilds only if the policy it was read for
still serves; a change there changes only SDS (or, for Consul, EDS) resources.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Protocol

from meshgate.controlplane.consul import ConsulCatalog
from meshgate.controlplane.secrets import read_secrets
from meshgate.controlplane.services import BackgroundTasks
from meshgate.xds.build import Identities
from meshgate.xds.gateway import Endpoints

if TYPE_CHECKING:
    from meshgate.controlplane.identity import IdentityIssuer
    from meshgate.controlplane.pipeline import CompiledPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    secrets: dict[str, str]
    identities: Identities | None
    endpoints: Endpoints = field(default_factory=dict)  # Consul instances per destination


InputsChange = Callable[[Inputs], Inputs]


class InputsConsumer(Protocol):
    async def update_inputs(self, policy: CompiledPolicy, change: InputsChange) -> bool:
        """Apply `change` to what serves for `policy`; False when `policy` no longer serves."""
        ...


class RuntimeInputs:
    def __init__(
        self,
        issuer: IdentityIssuer | None,
        consumer: Callable[[], InputsConsumer],  # late-bound: the consumer also reads from us
        interval: float = 1.0,
    ) -> None:
        self.issuer = issuer
        self.interval = interval
        self._consumer = consumer
        self._dirty = asyncio.Event()
        self.consul = ConsulCatalog(self._dirty.set)
        self._policy: CompiledPolicy | None = None
        self._tasks = BackgroundTasks()

    async def start(self) -> None:
        self._tasks.spawn(self._refresh_periodically(), "secrets-and-certificates")
        self._tasks.spawn(self._follow_consul(), "consul-endpoints")

    async def stop(self) -> None:
        await self._tasks.stop()
        await self.consul.close()

    # -- InputReader: what the publisher calls -----------------------------------------------

    async def read(self, policy: CompiledPolicy) -> Inputs:
        """Every input of `policy`, read in a worker thread."""
        secrets, identities = await asyncio.to_thread(self._secrets_and_identities, policy)
        return Inputs(secrets, identities, self.consul.endpoints(policy.resolved))

    async def follow(self, policy: CompiledPolicy) -> None:
        """`policy` now serves: refresh its inputs and watch the Consul services it names."""
        self._policy = policy
        try:
            await self.consul.configure(policy.resolved, policy.provider)
        except Exception:  # the policy is applied; a watcher bug must not undo or block that
            log.exception("consul: configuring the catalogue watches failed")

    # -- loops ---------------------------------------------------------------------------------

    def _secrets_and_identities(
        self, policy: CompiledPolicy
    ) -> tuple[dict[str, str], Identities | None]:
        identities = self.issuer.identities(policy.resolved) if self.issuer is not None else None
        return read_secrets(policy.resolved, policy.provider), identities

    async def _refresh_periodically(self) -> None:
        """Push rotated secrets and renewed certificates without a restart or a policy change."""
        while True:
            await asyncio.sleep(self.interval)
            policy = self._policy
            if policy is None:
                continue
            try:
                secrets, identities = await asyncio.to_thread(self._secrets_and_identities, policy)
                changed = await self._consumer().update_inputs(
                    policy, partial(replace, secrets=secrets, identities=identities)
                )
            except Exception:  # never let a provider hiccup stop rotation for good
                log.exception("refreshing secrets or certificates failed")
                continue
            if changed:
                log.info("secrets or certificates changed; pushed to the nodes that hold them")

    async def _follow_consul(self) -> None:
        """Rebuild when instances change: only the destination's ClusterLoadAssignment differs,
        so nodes get an EDS push and nothing else."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            policy = self._policy
            if policy is None:
                continue
            endpoints = self.consul.endpoints(policy.resolved)
            try:
                served = await self._consumer().update_inputs(
                    policy, partial(replace, endpoints=endpoints)
                )
            except Exception:
                log.exception("rebuilding after a Consul change failed")
                continue
            if not served and self._policy is not policy:
                self._dirty.set()  # a new policy won the race: redo against what serves now

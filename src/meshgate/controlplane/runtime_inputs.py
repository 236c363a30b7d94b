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
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Protocol

from meshgate.controlplane.consul import ConsulCatalog
from meshgate.controlplane.secrets import read_secrets
from meshgate.controlplane.services import BackgroundTasks
from meshgate.delegation.expand import KEY_SECRET, Service, SubAgent, expand
from meshgate.policy.model import PolicyModel
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
    sub_agents: tuple[SubAgent, ...] = ()  # delegation: sub-agents the policy still allows
    service: Service | None = None  # where gateways reach the delegation endpoint

    def model(self, resolved: PolicyModel) -> PolicyModel:
        """The policy as translated: with the sub-agents and the delegation service."""
        if not self.sub_agents and self.service is None:
            return resolved
        global _last_expanded
        last = _last_expanded  # one entry: the refresh loop asks every second, mostly unchanged
        if (
            last is not None
            and last[0] is resolved
            and last[1] == self.sub_agents
            and last[2] == self.service
        ):
            return last[3]
        model = expand(resolved, self.sub_agents, self.service).model
        _last_expanded = (resolved, self.sub_agents, self.service, model)
        return model


_last_expanded: tuple[PolicyModel, tuple[SubAgent, ...], Service | None, PolicyModel] | None = None


class DelegationSource(Protocol):
    """Sub-agents (delegation/registry.py) and the delegation endpoint, for runtime inputs."""

    key: str  # what gateways inject so the endpoint knows a request came through one

    def current(self, model: PolicyModel) -> tuple[SubAgent, ...]: ...

    def service(self) -> Service | None: ...


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
        delegation: DelegationSource | None = None,
    ) -> None:
        self.issuer = issuer
        self.interval = interval
        self.delegation = delegation
        self._poke = asyncio.Event()
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
        secrets, identities, subs, service = await asyncio.to_thread(
            self._secrets_and_identities, policy
        )
        return Inputs(secrets, identities, self.consul.endpoints(policy.resolved), subs, service)

    def poke(self) -> None:
        """Re-read now (a sub-agent was created or deleted), not at the next interval."""
        self._poke.set()

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
    ) -> tuple[dict[str, str], Identities | None, tuple[SubAgent, ...], Service | None]:
        secrets = read_secrets(policy.resolved, policy.provider)
        subs: tuple[SubAgent, ...] = ()
        service = None
        if self.delegation is not None:
            subs, service = self.delegation.current(policy.resolved), self.delegation.service()
            if service is not None:
                secrets[KEY_SECRET] = self.delegation.key
        model = Inputs(secrets, None, sub_agents=subs, service=service).model(policy.resolved)
        # a sub-agent's certificate and tool JWTs end with its delegation
        ends = {s.name: s.expires_at for s in subs}
        identities = self.issuer.identities(model, ends) if self.issuer is not None else None
        return secrets, identities, subs, service

    async def _refresh_periodically(self) -> None:
        """Push rotated secrets and renewed certificates without a restart or a policy change."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.interval)
            self._poke.clear()
            policy = self._policy
            if policy is None:
                continue
            try:
                secrets, identities, subs, service = await asyncio.to_thread(
                    self._secrets_and_identities, policy
                )
                changed = await self._consumer().update_inputs(
                    policy,
                    partial(
                        replace,
                        secrets=secrets,
                        identities=identities,
                        sub_agents=subs,
                        service=service,
                    ),
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

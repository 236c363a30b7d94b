"""Serving state -> snapshots (built in a worker thread) -> the snapshot cache.

`SnapshotPublisher` is the one writer of the cache. A new policy is served only once its inputs
are read and every snapshot built; a new input (secret, certificate, Consul instances) is
applied only while the policy it was read for still serves. Builds are serialised, so a slow
build for an old state can never overwrite a newer one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from meshgate.controlplane.pipeline import CompiledPolicy
from meshgate.controlplane.runtime_inputs import Inputs, InputsChange
from meshgate.policy.model import PolicyModel
from meshgate.xds.build import build_snapshots
from meshgate.xds.options import TranslateOptions
from meshgate.xds.snapshot import Snapshot


class InputReader(Protocol):
    async def read(self, policy: CompiledPolicy) -> Inputs: ...

    async def follow(self, policy: CompiledPolicy) -> None: ...


class SnapshotSink(Protocol):
    def set_snapshots(self, snapshots: Mapping[str, Snapshot]) -> object: ...


@dataclass(frozen=True)
class Serving:
    """The policy being served and the runtime inputs its snapshots were built from."""

    policy: CompiledPolicy
    inputs: Inputs

    def build(self, translate: TranslateOptions) -> dict[str, Snapshot]:
        i = self.inputs
        return build_snapshots(
            i.model(self.policy.resolved), translate, i.secrets, i.identities, i.endpoints
        )


class SnapshotPublisher:
    def __init__(
        self, cache: SnapshotSink, translate: TranslateOptions, inputs: InputReader
    ) -> None:
        self.cache = cache
        self.translate = translate
        self.inputs = inputs
        self.serving: Serving | None = None
        self._lock = asyncio.Lock()  # one build-and-swap at a time; no I/O happens under it

    async def apply_policy(self, policy: CompiledPolicy) -> None:
        """PolicyConsumer: read inputs, build, swap in; raises (nothing changes) on failure."""
        inputs = await self.inputs.read(policy)
        serving = Serving(policy, inputs)
        async with self._lock:
            snapshots = await asyncio.to_thread(serving.build, self.translate)
            self.serving = serving
            self.cache.set_snapshots(snapshots)
        await self.inputs.follow(policy)

    async def update_inputs(self, policy: CompiledPolicy, change: InputsChange) -> bool:
        """InputsConsumer: True when the change was new and is now served."""
        async with self._lock:
            current = self.serving
            if current is None or current.policy is not policy:
                return False
            inputs = change(current.inputs)
            if inputs == current.inputs:
                return False
            fresh = Serving(policy, inputs)
            snapshots = await asyncio.to_thread(fresh.build, self.translate)
            self.serving = fresh
            self.cache.set_snapshots(snapshots)
            return True

    def served_model(self) -> PolicyModel | None:
        """The model being served: the policy with its sub-agents (delegation)."""
        serving = self.serving
        return serving.inputs.model(serving.policy.resolved) if serving is not None else None

    def missing_secrets(self) -> list[str]:
        """Secrets the served policy's credentials name that the provider does not have."""
        if self.serving is None:
            return []
        model, values = self.serving.policy.resolved, self.serving.inputs.secrets
        return sorted(
            {d.credentials.secret for d in model.destinations if d.credentials} - set(values)
        )

"""The in-memory policy source, the twin of the directory and git sources, drives the pipeline."""

from __future__ import annotations

import asyncio

from builders import DEST_YAML as DEST
from builders import MESH_YAML as MESH

from meshgate.controlplane.pipeline import CompiledPolicy, PolicyPipeline
from meshgate.controlplane.sources import InMemorySource


class Served:
    def __init__(self) -> None:
        self.policies: list[CompiledPolicy] = []
        self.applied = self.rejected = 0

    async def apply_policy(self, policy: CompiledPolicy) -> None:
        self.policies.append(policy)

    def policy_applied(self) -> None:
        self.applied += 1

    def policy_rejected(self) -> None:
        self.rejected += 1


async def _settle(pipeline: PolicyPipeline, seen: Served, applied: int, rejected: int) -> None:
    for _ in range(200):
        if (seen.applied, seen.rejected) == (applied, rejected):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"applied/rejected {seen.applied}/{seen.rejected}")


async def test_changes_submitted_in_code_are_validated_applied_and_deduplicated() -> None:
    source = InMemorySource()
    seen = Served()
    pipeline = PolicyPipeline(source, seen, seen, quiet=0.01, max_delay=0.05)
    await pipeline.start()
    try:
        files = {"mesh.yaml": MESH, "a.yaml": DEST % ("alpha", "alpha")}
        source.submit(files)
        await _settle(pipeline, seen, 1, 0)
        source.submit(files)  # the same content again: not a change
        source.submit(files | {"bad.yaml": "kind: Nope\n"})  # refused, alpha keeps serving
        await _settle(pipeline, seen, 1, 1)
        source.fail("the API that feeds it is down")
        await _settle(pipeline, seen, 1, 2)
        source.submit(files | {"b.yaml": DEST % ("beta", "beta")})
        await _settle(pipeline, seen, 2, 2)
    finally:
        await pipeline.stop()
    served = [sorted(d.name for d in p.model.destinations) for p in seen.policies]
    assert served == [["alpha"], ["alpha", "beta"]]
    assert pipeline.state.rejection is None  # the last change applied

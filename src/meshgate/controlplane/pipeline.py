"""Policy source -> debounce -> compiled policy, off the event loop; the last good one serves.

`PolicyPipeline` watches a `PolicySource`, coalesces bursts (`Debouncer`), parses, validates
and compiles each candidate in a worker thread, and hands the result to a `PolicyConsumer`
(the snapshot publisher). The consumer may refuse it by raising (a translation error, an
unreadable secret store): the change is then rejected as a whole, the last good policy keeps
serving, and the problems are in `state` (status) and the log.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from meshgate.controlplane.debounce import Debouncer
from meshgate.controlplane.policy_state import PolicyState
from meshgate.controlplane.secrets import SecretProvider, make_provider
from meshgate.controlplane.services import BackgroundTasks
from meshgate.controlplane.sources import Candidate, PolicySource, SourceFailure
from meshgate.errors import MeshgateError, PolicyError
from meshgate.policy.loader import load_policy_texts
from meshgate.policy.model import PolicyModel
from meshgate.policy.paths import resolve_relative_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # identity matters: "is this still the policy serving?"
class CompiledPolicy:
    model: PolicyModel  # as written (status, `meshgate plan`)
    resolved: PolicyModel  # relative paths resolved against the source's root (translation)
    provider: SecretProvider
    origin: str


class PolicyConsumer(Protocol):
    async def apply_policy(self, policy: CompiledPolicy) -> None:
        """Serve `policy`, or raise to refuse it (the previous one keeps serving)."""
        ...


class PolicyMetrics(Protocol):
    def policy_applied(self) -> None: ...

    def policy_rejected(self) -> None: ...


def compile_candidate(candidate: Candidate) -> CompiledPolicy:
    """Blocking (parsing, file reads, maybe a secrets client): run in a worker thread."""
    model = load_policy_texts(candidate.files, candidate.version)
    resolved = resolve_relative_paths(model, candidate.root)
    return CompiledPolicy(model, resolved, make_provider(resolved.mesh.secrets), candidate.origin)


class PolicyPipeline:
    def __init__(
        self,
        source: PolicySource,
        consumer: PolicyConsumer,
        metrics: PolicyMetrics,
        quiet: float = 0.1,
        max_delay: float = 1.0,
    ) -> None:
        self.source = source
        self.consumer = consumer
        self.metrics = metrics
        self.state = PolicyState(source.description)
        self.debouncer: Debouncer[Candidate] = Debouncer(self._apply, quiet, max_delay)
        self._tasks = BackgroundTasks()

    async def start(self) -> None:
        self._tasks.spawn(self.debouncer.run(), "debounce")
        self._tasks.spawn(self._watch_source(), "policy-source")

    async def stop(self) -> None:
        await self._tasks.stop()

    async def _watch_source(self) -> None:
        async for change in self.source.changes():
            if isinstance(change, SourceFailure):
                self._reject(self.source.description, change.problems)
            else:
                self.debouncer.submit(change)

    async def _apply(self, candidate: Candidate) -> None:
        """Compile off the event loop; the consumer swaps it in only when everything succeeds."""
        try:
            policy = await asyncio.to_thread(compile_candidate, candidate)
            await self.consumer.apply_policy(policy)
        except PolicyError as exc:
            self._reject(candidate.origin, exc.problems)
            return
        except MeshgateError as exc:
            self._reject(candidate.origin, [str(exc)])
            return
        except Exception as exc:  # a translation bug must not stop later policy updates
            log.exception("internal error while compiling policy from %s", candidate.origin)
            self._reject(candidate.origin, [f"internal error while compiling policy: {exc!r}"])
            return
        model = policy.model
        self.state.applied(model, candidate.origin)
        self.metrics.policy_applied()
        log.info(
            "policy %s applied: %d agents, %d destinations",
            model.version,
            len(model.agents),
            len(model.destinations),
        )

    def _reject(self, origin: str, problems: list[str]) -> None:
        self.state.rejected(origin, problems)
        self.metrics.policy_rejected()
        kept = self.state.model.version if self.state.model else "none"
        log.error("policy change refused (still serving %s):\n  %s", kept, "\n  ".join(problems))


__all__ = ["CompiledPolicy", "PolicyConsumer", "PolicyMetrics", "PolicyPipeline"]

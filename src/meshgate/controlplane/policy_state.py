"""The policy the control plane serves, and what happened to the last change."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from meshgate.policy.model import PolicyModel


@dataclass
class Rejection:
    origin: str
    problems: list[str]
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "problems": self.problems,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
        }


@dataclass
class PolicyState:
    source: str
    model: PolicyModel | None = None
    origin: str | None = None
    applied_at: float | None = None
    rejection: Rejection | None = None  # the newest change that was refused, until one applies
    applied_count: int = 0

    def applied(self, model: PolicyModel, origin: str) -> None:
        self.model = model
        self.origin = origin
        self.applied_at = time.time()
        self.rejection = None
        self.applied_count += 1

    def rejected(self, origin: str, problems: list[str]) -> None:
        self.rejection = Rejection(origin, problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "version": self.model.version if self.model else None,
            "origin": self.origin,
            "applied_at": (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.applied_at))
                if self.applied_at
                else None
            ),
            "agents": len(self.model.agents) if self.model else 0,
            "destinations": len(self.model.destinations) if self.model else 0,
            "last_rejection": self.rejection.to_json() if self.rejection else None,
        }

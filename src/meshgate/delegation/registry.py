"""Sub-agents as a runtime input, kept in a `SubAgentStore` (`stores.py`): the state directory
by default, so a restarted control plane keeps them until they expire, or PostgreSQL, which
every control-plane replica reads and writes.

Creating one checks the request against the model being served (`rights.py`, `expand.py`), and
the store re-checks `maxSubAgents` and the name atomically (another replica may be creating one
too); the runtime-inputs loop then reads `current`, which re-reads the store and drops the
expired and those the served policy no longer allows (for good: a parent regaining a right does
not bring them back). Blocking I/O: call from a worker thread, except `all()`, which answers from
what the last read saw (status pages call it from the event loop).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshgate.delegation import names
from meshgate.delegation.expand import (
    SERVICE_DESTINATION,
    Expansion,
    SubAgent,
    derive,
    expand,
)
from meshgate.delegation.rights import DelegationError, RuleGrant, sub_delegation, sub_rules
from meshgate.delegation.stores import (
    DelegationStoreError,
    FileStore,
    SubAgentStore,
)
from meshgate.policy.model import Delegation, PolicyModel

log = logging.getLogger(__name__)
# How long `current` keeps serving what it last read while the store does not answer (a
# database restart); past that, no sub-agent is served until it answers again (fail closed).
STALE_LIMIT = 30.0


@dataclass(frozen=True)
class Request:
    """What a supervisor asks for (the service parses it from JSON)."""

    name: str  # the child's own label
    ttl_seconds: int
    grants: tuple[RuleGrant, ...]
    delegation: Delegation | None = None


class DelegationRegistry:
    def __init__(self, store: SubAgentStore | Path, clock: Callable[[], float]) -> None:
        """`store`, or a state directory for the file store in `<state_dir>/delegation`."""
        self.store: SubAgentStore = (
            FileStore(store / "delegation") if isinstance(store, Path) else store
        )
        self._clock = clock
        self._lock = threading.Lock()  # guards the fields below; never held across I/O
        self._seen: tuple[SubAgent, ...] = tuple(self.store.load())  # what the last read saw
        self._failing_since: float | None = None
        self._policy: tuple[str, float] | None = None  # (version, since when it is served)
        self.key = self.store.gateway_key()

    # -- what the service calls ----------------------------------------------------------------

    def create(self, caller: str, request: Request, model: PolicyModel) -> SubAgent:
        """Check `request` from `caller` against the served `model` (already expanded with the
        current sub-agents) and keep the new sub-agent; DelegationError says why not."""
        if not names.is_label(request.name):
            raise DelegationError(
                f"name {request.name!r}: a DNS label (a-z, 0-9, '-', at most 63 chars)"
            )
        if names.depth(caller) >= names.MAX_DEPTH:
            raise DelegationError(
                f"{caller!r} is {names.depth(caller)} levels below its policy agent: sub-agents "
                f"nest at most {names.MAX_DEPTH} deep"
            )
        parent = model.agent(caller)
        if parent is None:
            raise DelegationError(f"{caller!r} is not an agent of the served policy")
        right = parent.delegation
        if right is None:
            raise DelegationError(f"{caller!r} may not delegate (its policy has no `delegation`)")
        if not 0 < request.ttl_seconds <= right.max_ttl_seconds:
            raise DelegationError(
                f"ttl: at most {right.max_ttl_seconds}s (maxTtl of {caller!r}), and above 0"
            )
        # the parent's rules without the service rule expansion appended: numbered as in policy
        own_rules = tuple(r for r in parent.rules if r.destination != SERVICE_DESTINATION)
        rules_of_parent = dataclasses.replace(parent, rules=own_rules)
        _, prints = sub_rules(rules_of_parent, request.grants)
        delegation = sub_delegation(right, request.delegation)
        now = int(self._clock())
        name = names.sub_agent_name(caller, request.name)

        def make(children: Sequence[SubAgent], own: SubAgent | None) -> SubAgent:
            """Inside the store's lock or transaction: what another replica may have changed."""
            if any(s.name == name for s in children):
                raise DelegationError(f"{name!r} exists already (delete it first)")
            live = [s for s in children if s.expires_at > now]
            if len(live) >= right.max_sub_agents:
                raise DelegationError(
                    f"{caller!r} has {len(live)} sub-agents already: maxSubAgents is "
                    f"{right.max_sub_agents}"
                )
            expires = now + request.ttl_seconds
            if names.depth(caller) > 0:
                if own is None or own.expires_at <= now:
                    raise DelegationError(f"{caller!r} itself is no longer delegated")
                expires = min(expires, own.expires_at)  # never outlives its parent
            sub = SubAgent(name, request.grants, prints, now, expires, delegation)
            derive(sub, {caller: rules_of_parent}, {}, {})  # the check every build makes
            return sub

        sub = self.store.add(caller, make)
        with self._lock:
            self._seen = (*self._seen, sub)
        return sub

    def set_token(self, sub: SubAgent, token_id: str) -> None:
        self.store.set_token(sub, token_id)

    def delete(self, caller: str, name: str) -> list[SubAgent]:
        """Remove `caller`'s sub-agent `name` and everything below it; the removed ones."""
        full = names.sub_agent_name(caller, name)
        gone = self.store.remove_tree(full)
        if not gone:
            raise DelegationError(f"{caller!r} has no sub-agent {name!r}")
        names_gone = {s.name for s in gone}
        with self._lock:
            self._seen = tuple(s for s in self._seen if s.name not in names_gone)
        return sorted(gone, key=lambda s: s.name)

    def children(self, caller: str) -> list[SubAgent]:
        """`caller`'s sub-agents as the store has them now (another replica may have added one)."""
        now = self._clock()
        return sorted(
            (s for s in self.store.load() if s.parent == caller and s.expires_at > now),
            key=lambda s: s.name,
        )

    def all(self) -> list[SubAgent]:
        """What the last read of the store saw (no I/O: status reads it on the event loop)."""
        with self._lock:
            return sorted(self._seen, key=lambda s: s.name)

    # -- what runtime inputs read ---------------------------------------------------------------

    def current(self, model: PolicyModel) -> tuple[SubAgent, ...]:
        """The sub-agents `model` (the policy as written) still allows, now; the rest are
        dropped for good, with a log line saying why.

        With replicas, another one may serve a newer (or older) policy for a moment, so a
        sub-agent this policy does not allow is dropped for good only if it was created after
        this replica began serving it; a younger one is only left out until this replica serves
        the policy it was created under."""
        now = self._clock()
        with self._lock:
            if self._policy is None or self._policy[0] != model.version:
                self._policy = (model.version, now)
            policy_since = self._policy[1]
        try:
            subs = self.store.load()
        except DelegationStoreError as exc:
            return self._unanswered(model, now, exc)
        with self._lock:
            self._failing_since = None
        if not subs:  # the common case, every second: no work proportional to the policy
            with self._lock:
                self._seen = ()
            return ()
        expired = [s for s in subs if s.expires_at <= now]
        result: Expansion = expand(model, [s for s in subs if s.expires_at > now])
        revoked = [(s, why) for s, why in result.revoked if s.created_at <= policy_since]
        dropped = [(s, "expired") for s in expired] + revoked
        if dropped:
            try:
                self.store.discard([s for s, _ in dropped])
            except DelegationStoreError as exc:  # served without them anyway; retried next time
                log.warning("delegation store: could not drop sub-agents: %s", exc)
            else:
                for s, why in dropped:
                    log.info("sub-agent %s revoked: %s", s.name, why)
        gone = {s.name for s, _ in dropped}
        with self._lock:
            self._seen = tuple(s for s in subs if s.name not in gone)
        return result.active

    def _unanswered(
        self, model: PolicyModel, now: float, exc: DelegationStoreError
    ) -> tuple[SubAgent, ...]:
        with self._lock:
            since = self._failing_since = self._failing_since or now
            seen = self._seen
        if now - since >= STALE_LIMIT:
            log.error("delegation store: %s; serving no sub-agents until it answers", exc)
            return ()
        log.warning("delegation store: %s; serving the sub-agents it last listed", exc)
        return expand(model, [s for s in seen if s.expires_at > now]).active


def describe(sub: SubAgent) -> dict[str, Any]:
    """A sub-agent as the service and `meshgate delegation list` show it."""
    return {
        "agent": sub.name,
        "parent": sub.parent,
        "chain": names.chain_text(sub.name),
        "created_at": _iso(sub.created_at),
        "expires_at": _iso(sub.expires_at),
        "rules": [
            {
                "rule": g.rule,
                **{
                    k: list(v)
                    for k, v in (("methods", g.methods), ("paths", g.paths), ("tools", g.tools))
                    if v
                },
            }
            for g in sub.grants
        ],
        "delegation": (
            {
                "maxSubAgents": sub.delegation.max_sub_agents,
                "maxTtlSeconds": sub.delegation.max_ttl_seconds,
            }
            if sub.delegation
            else None
        ),
    }


def _iso(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()

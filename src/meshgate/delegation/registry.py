"""Sub-agents as a runtime input, kept in a `SubAgentStore` (`stores.py`): the state directory
by default, so a restarted control plane keeps them until they expire, or PostgreSQL, which
every control-plane replica reads and writes.

Creating one checks the request against the model being served (`rights.py`, `expand.py`), and
the store re-checks `maxSubAgents` and the name atomically (another replica may be creating one
too). `refresh` re-reads the store (its own thread, `controlplane/delegation.py`, every second);
`current`, which the runtime inputs call for every policy change, answers from what it last read
and never waits on the store (a stalled database must not hold up a policy change, least of all
one removing rights): it leaves out the expired and those the served policy no longer allows,
and the next `refresh` deletes them for good (a parent regaining a right does not bring them
back). Past `STALE_LIMIT` since the last successful read, it serves none (fail closed). Blocking
I/O (`create`, `delete`, `children`, `refresh`): call from a worker thread; `current`, `all` and
`token_of` do none.
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
# How long after the last successful read `current` keeps serving what it read while the store
# does not answer (a database restart); past that, no sub-agent is served until it answers again
# (fail closed).
STALE_LIMIT = 30.0

_Key = tuple[str, int, int]  # one delegation: (name, created_at, expires_at)


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
        # what the last read saw, less what was deleted or dropped since
        self._seen: dict[str, SubAgent] = {s.name: s for s in self.store.load()}
        self._read_at = clock()  # of the last successful read
        self._writes = 0  # creates and deletes here: a read that overlapped one is redone
        self._dropped: dict[_Key, SubAgent] = {}  # left out by `current`; `refresh` deletes them
        self._stale = False
        self._policy: tuple[str, float] | None = None  # (version, since when it is served)
        self.key = self.store.gateway_key()

    # -- what the service calls ----------------------------------------------------------------

    def create(
        self, caller: str, request: Request, model: PolicyModel, token_id: str = ""
    ) -> SubAgent:
        """Check `request` from `caller` against the served `model` (already expanded with the
        current sub-agents) and keep the new sub-agent, with the id of the join token about to
        be issued for it; DelegationError says why not."""
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
            sub = SubAgent(name, request.grants, prints, now, expires, delegation, token_id)
            derive(sub, {caller: rules_of_parent}, {}, {})  # the check every build makes
            return sub

        sub = self.store.add(caller, make)
        with self._lock:
            self._seen[sub.name] = sub
            self._writes += 1
        return sub

    def discard(self, sub: SubAgent) -> None:
        """Undo a create whose join token could not be issued."""
        self.store.discard([sub])
        with self._lock:
            if self._seen.get(sub.name) == sub:
                del self._seen[sub.name]
            self._writes += 1

    def delete(self, caller: str, name: str) -> list[SubAgent]:
        """Remove `caller`'s sub-agent `name` and everything below it; the removed ones."""
        full = names.sub_agent_name(caller, name)
        gone = self.store.remove_tree(full)
        if not gone:
            raise DelegationError(f"{caller!r} has no sub-agent {name!r}")
        with self._lock:
            for s in gone:
                self._seen.pop(s.name, None)
            self._writes += 1
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
            subs = [s for s in self._seen.values() if _key(s) not in self._dropped]
        return sorted(subs, key=lambda s: s.name)

    def token_of(self, name: str) -> str | None:
        """The join token id stored with sub-agent `name`, None when there is none now (as the
        last read saw it: no I/O, called for every xDS stream a sub-agent opens)."""
        now = self._clock()
        with self._lock:
            sub = self._seen.get(name)
            if sub is None or sub.expires_at <= now or _key(sub) in self._dropped:
                return None
            if now - self._read_at >= STALE_LIMIT:
                return None  # served as none: nor is it let in
            return sub.token_id

    # -- the refresh thread ---------------------------------------------------------------------

    def refresh(self) -> bool:
        """Delete what `current` dropped, then re-read the store (blocking: the refresh thread).
        True when what it lists changed; a store that does not answer is logged, not raised."""
        with self._lock:
            dropped = list(self._dropped.values())
        if dropped:
            try:
                self.store.discard(dropped)
            except DelegationStoreError as exc:  # left out meanwhile; retried next time
                log.warning("delegation store: could not drop sub-agents: %s", exc)
            else:
                with self._lock:
                    for s in dropped:
                        self._dropped.pop(_key(s), None)
                        if s.name in self._seen and _key(self._seen[s.name]) == _key(s):
                            del self._seen[s.name]
        for _ in range(3):  # a create or delete here during the read: read again
            with self._lock:
                writes = self._writes
            try:
                subs = self.store.load()
            except DelegationStoreError as exc:
                log.warning("delegation store: %s; serving the sub-agents it last listed", exc)
                return False
            now = self._clock()
            with self._lock:
                if self._writes != writes:
                    continue
                before = self._seen
                self._seen = {s.name: s for s in subs}
                self._read_at = now
                if self._stale:
                    log.info("delegation store answers again: serving its sub-agents")
                self._stale = False
                return self._seen != before
        return True  # busy with writes: the next refresh reads again

    # -- what runtime inputs read ---------------------------------------------------------------

    def current(self, model: PolicyModel) -> tuple[SubAgent, ...]:
        """The sub-agents `model` (the policy as written) still allows, now, from what the last
        read saw (no I/O); the rest are dropped for good, with a log line saying why.

        With replicas, another one may serve a newer (or older) policy for a moment, so a
        sub-agent this policy does not allow is dropped for good only if it was created after
        this replica began serving it; a younger one is only left out until this replica serves
        the policy it was created under. A sub-agent whose parent sub-agent was deleted is
        dropped whatever the policy."""
        now = self._clock()
        with self._lock:
            if self._policy is None or self._policy[0] != model.version:
                self._policy = (model.version, now)
            policy_since = self._policy[1]
            subs = [s for s in self._seen.values() if _key(s) not in self._dropped]
            stale = now - self._read_at >= STALE_LIMIT
            if stale and not self._stale:
                log.error(
                    "delegation store: no answer for %.0fs; serving no sub-agents until it answers",
                    now - self._read_at,
                )
            self._stale = stale
        if stale or not subs:  # the common case, every second: no work proportional to policy
            return ()
        expired = [s for s in subs if s.expires_at <= now]
        orphans = orphaned(subs)
        result: Expansion = expand(
            model, [s for s in subs if s.expires_at > now and s.name not in orphans]
        )
        revoked = [(s, why) for s, why in result.revoked if s.created_at <= policy_since]
        dropped = [(s, "expired") for s in expired]
        # whatever the policy: no policy brings a deleted parent back, and a later delegation
        # of the parent's name must not inherit the child
        dropped += [(s, orphans[s.name]) for s in subs if s.name in orphans]
        dropped += revoked
        if dropped:
            with self._lock:
                for s, _ in dropped:
                    self._dropped[_key(s)] = s
            for s, why in dropped:
                log.info("sub-agent %s revoked: %s", s.name, why)
        return result.active


def _key(sub: SubAgent) -> _Key:
    return (sub.name, sub.created_at, sub.expires_at)


def orphaned(subs: Sequence[SubAgent]) -> dict[str, str]:
    """Sub-agents whose parent sub-agent is gone from the store, or is a later delegation of
    that name (created after the child), and everything below them; with why."""
    stored = {s.name: s for s in subs}
    out: dict[str, str] = {}
    for s in sorted(subs, key=lambda s: names.depth(s.name)):
        if names.depth(s.name) < 2:
            continue  # its parent is a policy agent: the policy decides
        parent = stored.get(s.parent)
        if parent is None:
            out[s.name] = f"its parent {s.parent!r} no longer exists"
        elif s.parent in out or parent.created_at > s.created_at:
            out[s.name] = f"its parent {s.parent!r} was deleted"
    return out


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

"""Sub-agents as a runtime input: kept in `<state_dir>/delegation/`, so a restarted control
plane keeps them until they expire.

Creating one checks the request against the model being served (`rights.py`, `expand.py`); the
runtime-inputs loop then reads `current`, which drops the expired and those the served policy
no longer allows (for good: a parent regaining a right does not bring them back). Blocking file
I/O: call from a worker thread. One lock guards the list; no I/O but the small file write
happens under it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
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
from meshgate.identity.keyfiles import create_exclusive
from meshgate.policy.model import Delegation, PolicyModel

log = logging.getLogger(__name__)
FILE = "sub-agents.json"
KEY_FILE = "gateway-key"


@dataclass(frozen=True)
class Request:
    """What a supervisor asks for (the service parses it from JSON)."""

    name: str  # the child's own label
    ttl_seconds: int
    grants: tuple[RuleGrant, ...]
    delegation: Delegation | None = None


class DelegationRegistry:
    def __init__(self, state_dir: Path, clock: Callable[[], float]) -> None:
        self.directory = state_dir / "delegation"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._subs: dict[str, SubAgent] = {s.name: s for s in self._load()}
        self.key = self._load_or_create_key()

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
        own = tuple(r for r in parent.rules if r.destination != SERVICE_DESTINATION)
        rules_of_parent = dataclasses.replace(parent, rules=own)
        _, prints = sub_rules(rules_of_parent, request.grants)
        delegation = sub_delegation(right, request.delegation)
        now = int(self._clock())
        name = names.sub_agent_name(caller, request.name)
        with self._lock:
            if name in self._subs:
                raise DelegationError(f"{name!r} exists already (delete it first)")
            mine = [s for s in self._subs.values() if s.parent == caller]
            if len(mine) >= right.max_sub_agents:
                raise DelegationError(
                    f"{caller!r} has {len(mine)} sub-agents already: maxSubAgents is "
                    f"{right.max_sub_agents}"
                )
            expires = now + request.ttl_seconds
            if parent_sub := self._subs.get(caller):
                expires = min(expires, parent_sub.expires_at)  # never outlives its parent
            sub = SubAgent(name, request.grants, prints, now, expires, delegation)
            derive(sub, {caller: rules_of_parent}, {}, {})  # the check every build makes
            self._subs[name] = sub
            self._save()
        return sub

    def set_token(self, name: str, token_id: str) -> None:
        with self._lock:
            sub = self._subs.get(name)
            if sub is not None:
                self._subs[name] = SubAgent(
                    sub.name, sub.grants, sub.fingerprints, sub.created_at, sub.expires_at,
                    sub.delegation, token_id,
                )  # fmt: skip
                self._save()

    def delete(self, caller: str, name: str) -> list[SubAgent]:
        """Remove `caller`'s sub-agent `name` and everything below it; the removed ones."""
        full = names.sub_agent_name(caller, name)
        with self._lock:
            gone = [s for n, s in self._subs.items() if n == full or n.startswith(full + ".")]
            if not gone:
                raise DelegationError(f"{caller!r} has no sub-agent {name!r}")
            for s in gone:
                del self._subs[s.name]
            self._save()
        return gone

    def children(self, caller: str) -> list[SubAgent]:
        with self._lock:
            return sorted(
                (s for s in self._subs.values() if s.parent == caller), key=lambda s: s.name
            )

    def all(self) -> list[SubAgent]:
        with self._lock:
            return sorted(self._subs.values(), key=lambda s: s.name)

    # -- what runtime inputs read ---------------------------------------------------------------

    def current(self, model: PolicyModel) -> tuple[SubAgent, ...]:
        """The sub-agents `model` (the policy as written) still allows, now; the rest are
        dropped for good, with a log line saying why."""
        now = self._clock()
        with self._lock:
            subs = list(self._subs.values())
        if not subs:  # the common case, every second: no work proportional to the policy
            return ()
        expired = [s for s in subs if s.expires_at <= now]
        result: Expansion = expand(model, [s for s in subs if s.expires_at > now])
        dropped = [(s, "expired") for s in expired] + list(result.revoked)
        if dropped:
            with self._lock:
                for s, _ in dropped:
                    if self._subs.get(s.name) == s:
                        del self._subs[s.name]
                self._save()
            for s, why in dropped:
                log.info("sub-agent %s revoked: %s", s.name, why)
        return result.active

    # -- persistence ----------------------------------------------------------------------------

    def _load(self) -> list[SubAgent]:
        path = self.directory / FILE
        try:
            data = json.loads(path.read_text())
            return [_from_json(item) for item in data]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
            # fail closed for the sub-agents (they lose their rights), not for the mesh
            aside = path.with_name(f"{FILE}.unreadable")
            log.error("%s: unreadable (%s); moved to %s, no sub-agents kept", path, exc, aside)
            os.replace(path, aside)
            return []

    def _save(self) -> None:
        path = self.directory / FILE
        tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump([_to_json(s) for s in self._subs.values()], fh)
        os.replace(tmp, path)

    def _load_or_create_key(self) -> str:
        """What gateways prove with that a request came through them (`expand.KEY_HEADER`)."""
        path = self.directory / KEY_FILE
        if not path.exists():
            create_exclusive(path, secrets.token_hex(32).encode())
        return path.read_text().strip()


def _to_json(s: SubAgent) -> dict[str, Any]:
    return {
        "name": s.name,
        "grants": [
            {"rule": g.rule, "methods": g.methods, "paths": g.paths, "tools": g.tools}
            for g in s.grants
        ],
        "fingerprints": list(s.fingerprints),
        "created_at": s.created_at,
        "expires_at": s.expires_at,
        "delegation": (
            [s.delegation.max_sub_agents, s.delegation.max_ttl_seconds] if s.delegation else None
        ),
        "token_id": s.token_id,
    }


def _from_json(d: dict[str, Any]) -> SubAgent:
    deleg = d.get("delegation")
    return SubAgent(
        name=str(d["name"]),
        grants=tuple(
            RuleGrant(int(g["rule"]), tuple(g["methods"]), tuple(g["paths"]), tuple(g["tools"]))
            for g in d["grants"]
        ),
        fingerprints=tuple(d["fingerprints"]),
        created_at=int(d["created_at"]),
        expires_at=int(d["expires_at"]),
        delegation=Delegation(int(deleg[0]), int(deleg[1])) if deleg else None,
        token_id=str(d.get("token_id", "")),
    )


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

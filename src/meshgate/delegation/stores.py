"""Where sub-agents live: a `SubAgentStore`, so several control-plane replicas can share them.

`FileStore` (the embedded default: `<state_dir>/delegation/`, one process) and, for replicas,
`adapters/postgres_delegation.PostgresSubAgentStore`. Both keep the same JSON per sub-agent
(`to_json`), serialise every write (`add`, `remove_tree`, `discard`) against every other writer, so
maxSubAgents and a child's name are checked inside `add` and a parent deleted meanwhile waits for
it (and takes the child) or refuses it (no orphan), and hold the gateway key: what gateways inject
so the endpoint knows a request came through one (`expand.KEY_HEADER`), so it must be the same on
every replica a gateway may reach. Every method blocks (disk, a database): call from a worker
thread.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from meshgate.delegation.expand import SubAgent
from meshgate.delegation.rights import DelegationError, RuleGrant
from meshgate.errors import ConfigError, MeshgateError
from meshgate.identity.keyfiles import create_exclusive
from meshgate.policy.model import Delegation
from meshgate.urls import redact_url

log = logging.getLogger(__name__)
FILE = "sub-agents.json"
KEY_FILE = "gateway-key"
STORE_ENV = "MESHGATE_DELEGATION_STORE"

# `make(children, own)`: the caller's current sub-agents and its own record (None for a policy
# agent) -> the sub-agent to add, or DelegationError. Pure: it runs inside the store's lock or
# transaction.
Make = Callable[[Sequence[SubAgent], SubAgent | None], SubAgent]


class DelegationStoreError(MeshgateError):
    """The store did not answer (a database down): the operation did not happen."""


class SubAgentStore(Protocol):
    def load(self) -> list[SubAgent]:
        """Every stored sub-agent (expired ones too, until discarded)."""
        ...

    def add(self, parent: str, make: Make) -> SubAgent:
        """Atomically against every writer of this store (`remove_tree` and `discard` too):
        call `make` with `parent`'s current sub-agents and its own record, then keep what it
        returns (its name must be new)."""
        ...

    def remove_tree(self, name: str) -> list[SubAgent]:
        """Remove `name` and everything below it; what was removed."""
        ...

    def discard(self, subs: Sequence[SubAgent]) -> None:
        """Remove these (expired or revoked), unless one was replaced meanwhile."""
        ...

    def gateway_key(self) -> str:
        """The key every replica sharing this store agrees on (created once)."""
        ...

    def close(self) -> None: ...


def same(a: SubAgent, b: SubAgent) -> bool:
    """The same delegation (not a later one of the same name)."""
    return (a.name, a.created_at, a.expires_at) == (b.name, b.created_at, b.expires_at)


def within(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


class FileStore:
    """One JSON file, written whole (temporary file + rename). One process: the list is kept in
    memory; writers queue on `_write`, readers take `_lock` only to copy the list."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the list; never held across I/O
        self._write = threading.Lock()  # one writer at a time, across its file write
        self._subs: dict[str, SubAgent] = {s.name: s for s in self._read()}
        self._key = self._load_or_create_key()

    def load(self) -> list[SubAgent]:
        with self._lock:
            return list(self._subs.values())

    def add(self, parent: str, make: Make) -> SubAgent:
        with self._write:
            subs = self.load()
            own = next((s for s in subs if s.name == parent), None)
            sub = make([s for s in subs if s.parent == parent], own)
            if any(s.name == sub.name for s in subs):
                raise DelegationError(f"{sub.name!r} exists already (delete it first)")
            self._commit([*subs, sub])
        return sub

    def remove_tree(self, name: str) -> list[SubAgent]:
        with self._write:
            subs = self.load()
            gone = [s for s in subs if within(s.name, name)]
            if gone:
                self._commit([s for s in subs if not within(s.name, name)])
        return gone

    def discard(self, subs: Sequence[SubAgent]) -> None:
        with self._write:
            held = self.load()
            kept = [s for s in held if not any(same(s, d) for d in subs)]
            if len(kept) != len(held):
                self._commit(kept)

    def gateway_key(self) -> str:
        return self._key

    def close(self) -> None:
        pass

    def _commit(self, subs: list[SubAgent]) -> None:
        path = self.directory / FILE
        tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump([to_json(s) for s in subs], fh)
        os.replace(tmp, path)
        with self._lock:
            self._subs = {s.name: s for s in subs}

    def _read(self) -> list[SubAgent]:
        path = self.directory / FILE
        try:
            data = json.loads(path.read_text())
            return [from_json(item) for item in data]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
            # fail closed for the sub-agents (they lose their rights), not for the mesh
            aside = path.with_name(f"{FILE}.unreadable")
            log.error("%s: unreadable (%s); moved to %s, no sub-agents kept", path, exc, aside)
            os.replace(path, aside)
            return []

    def _load_or_create_key(self) -> str:
        path = self.directory / KEY_FILE
        if not path.exists():
            create_exclusive(path, new_key().encode())
        return path.read_text().strip()


def new_key() -> str:
    return secrets.token_hex(32)


def open_store(target: str, state_dir: Path) -> SubAgentStore:
    """`postgresql://...[?schema=name]` (shared by replicas), a directory (`file:` or a plain
    path), or "" for `<state_dir>/delegation`. Connection errors are ConfigErrors (one line)."""
    text = target.strip()
    if not text:
        return FileStore(state_dir / "delegation")
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme in ("postgresql", "postgres"):
        from meshgate.adapters.postgres_delegation import DEFAULT_SCHEMA, PostgresSubAgentStore
        from meshgate.audit.open import parse_target

        parsed = parse_target(text)
        return PostgresSubAgentStore(parsed.location, schema=parsed.schema or DEFAULT_SCHEMA)
    if scheme == "file":
        path = text[len("file:") :]
        path = "/" + path.lstrip("/") if path.startswith("//") else path
        return FileStore(Path(path))
    if "://" in text:
        raise ConfigError(
            f"delegation store {redact_url(text)!r}: use postgresql://... (shared by replicas) "
            "or a directory"
        )
    return FileStore(Path(text))


# -- the JSON both stores keep -------------------------------------------------------------------


def to_json(s: SubAgent) -> dict[str, Any]:
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


def from_json(d: dict[str, Any]) -> SubAgent:
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

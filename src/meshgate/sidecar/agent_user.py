"""Who CMD runs as under `sidecar run`, and the proof that it cannot read the mesh's keys.

The agent is hostile: anything its user can read, it reads (the join-token signing key, CA
keys, bootstraps holding tokens, spools it could forge). So CMD never runs as the launcher's
user by default: a root launcher drops it to another user (default `nobody`), and a launcher
that cannot drop refuses, unless the operator accepts the risk with --insecure-same-user.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from meshgate.errors import ConfigError

DEFAULT_AGENT_USER = "nobody"
INSECURE_SAME_USER = "--insecure-same-user"

# Credentials the operator's shell may hold that are meshgate's, not the agent's.
LAUNCHER_SECRETS = (
    "MESHGATE_ADMIN_TOKEN",
    "MESHGATE_AUDIT_STORE",  # a DSN, usually with a password
    "MESHGATE_TEST_POSTGRES",
    "VAULT_TOKEN",
    "VAULT_SECRET_ID",
    "VAULT_ROLE_ID",
    "CONSUL_HTTP_TOKEN",
)


@dataclass(frozen=True)
class AgentUser:
    """uid/gid < 0: the launcher's own user (insecure)."""

    name: str
    uid: int
    gid: int
    home: str

    @property
    def same_as_launcher(self) -> bool:
        return self.uid < 0


def resolve_agent_user(user: str | None, insecure_same_user: bool) -> AgentUser:
    """The user CMD runs as; a one-line error when that user would share the launcher's."""
    me = os.geteuid()
    if insecure_same_user:
        if user is not None:
            raise ConfigError(f"--user and {INSECURE_SAME_USER} exclude each other")
        return AgentUser(pwd.getpwuid(me).pw_name, -1, -1, os.environ.get("HOME", "/"))
    if me != 0:
        name = pwd.getpwuid(me).pw_name
        raise ConfigError(
            f"CMD would run as {name}, the user that runs the sidecar, and could read the "
            "mesh's keys and tokens and forge its audit spool. Run `sidecar run` as root "
            f"(it then runs CMD as --user, default {DEFAULT_AGENT_USER}), or accept the risk "
            f"with {INSECURE_SAME_USER}"
        )
    wanted = user or DEFAULT_AGENT_USER
    try:
        entry = pwd.getpwuid(int(wanted)) if wanted.isdigit() else pwd.getpwnam(wanted)
    except (KeyError, ValueError):
        raise ConfigError(f"--user {wanted!r}: no such user") from None
    if entry.pw_uid == 0:
        raise ConfigError(
            f"--user {wanted!r} is root: CMD would hold every key; pick an unprivileged user"
        )
    return AgentUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir or "/")


def reachable_by(path: Path, user: AgentUser) -> bool:
    """Could `user` enter (traverse) the directory `path`, by the mode bits?"""
    if user.same_as_launcher:
        return True
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if st.st_uid == user.uid:
        return True
    groups = {user.gid, *(g.gr_gid for g in grp.getgrall() if user.name in g.gr_mem)}
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def check_state_dir_private(state_dir: Path, user: AgentUser) -> None:
    """Refuse to run CMD as a user who could enter the state directory."""
    if reachable_by(state_dir, user):
        raise ConfigError(
            f"{state_dir} (keys, tokens, audit spools) is reachable by user {user.name}, "
            f"who would run CMD: make it private to its owner (chmod 700 {state_dir}) or "
            "pick another --user"
        )


def agent_environment(env: dict[str, str], user: AgentUser) -> dict[str, str]:
    """CMD's environment: the launcher's, less meshgate's own credentials, as `user`."""
    out = {k: v for k, v in env.items() if k not in LAUNCHER_SECRETS}
    if not user.same_as_launcher:
        out.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    return out


def private_dir(path: Path) -> None:
    """Create `path` (and parents) and make it 0700 if we own it: the state directory holds
    keys, tokens and spools that no agent may read or write."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid == os.geteuid() and stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)

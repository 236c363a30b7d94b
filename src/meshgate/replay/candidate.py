"""The candidate policy of a replay: a directory, a git source URL, or REF[:DIR] of this repo.

A ref is read from commits only (as the control plane's git source does), so what is replayed
is exactly what would be merged; its version is the commit SHA.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from meshgate.adapters.git import GitCli
from meshgate.controlplane.sources import GitPolicySource
from meshgate.errors import PolicyError
from meshgate.policy.loader import load_policy_dir
from meshgate.policy.model import PolicyModel


def load_candidate(spec: str, state_dir: Path, cwd: Path | None = None) -> PolicyModel:
    """`spec`: an existing directory; `git+URL@ref#dir` (mirrored under the state dir); or
    `REF[:DIR]` in the git repository around `cwd` (`main`, `origin/main:policies`, a SHA)."""
    path = Path(spec)
    if path.is_dir():
        return load_policy_dir(path)
    if spec.startswith("git+") or "://" in spec:
        source = GitPolicySource.from_source(spec, state_dir / "git-cache")
        return source.load(source.fetch())
    ref, _, subdir = spec.partition(":")
    repo = GitCli(str(cwd or Path.cwd()), state_dir / "git-cache")
    repo.repo = _git_dir(cwd or Path.cwd(), spec)
    source = GitPolicySource(repo, ref or "HEAD", subdir)
    return source.load(repo.resolve(source.ref))


def _git_dir(cwd: Path, spec: str) -> Path:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--absolute-git-dir"],
            cwd=cwd,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        raise PolicyError(
            [f"{spec}: not a policy directory, and {cwd} is not in a git repository to read a ref"]
        )
    return Path(done.stdout.decode().strip())

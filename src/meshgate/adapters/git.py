"""A git repository as the policy source needs it: fetch, resolve a ref, read files at a commit.

`GitCli` keeps a mirror clone under a cache directory and runs the git CLI on it (no prompts,
bounded time); `InMemoryGit` is its twin. Only committed content is ever visible, and only
after `fetch()`. Failures are `PolicyError` naming the repository URL.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from meshgate.errors import PolicyError

GIT_TIMEOUT = 120.0
_SHA = re.compile(r"[0-9a-f]{4,64}")


class GitRepository(Protocol):
    url: str

    def fetch(self) -> None:
        """Bring the local copy up to date with the remote."""
        ...

    def resolve(self, ref: str) -> str:
        """The full commit SHA `ref` (branch, tag, HEAD, SHA) names, as of the last fetch."""
        ...

    def list_files(self, sha: str, subdir: str = "") -> list[str]:
        """Regular files (no symlinks, no submodules) under `subdir` in commit `sha`, by their
        path from the repository root."""
        ...

    def read_file(self, sha: str, path: str) -> bytes: ...


def check_sha(url: str, sha: str) -> None:
    """A commit id, never an option or a revision expression reaching git's command line."""
    if not _SHA.fullmatch(sha):
        raise PolicyError([f"{url}: invalid commit {sha!r}"])


class GitCli:
    """`GitRepository` over the git CLI: a mirror clone in `cache_dir`, read by commit SHA."""

    def __init__(self, url: str, cache_dir: Path) -> None:
        self.url = url
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        self.repo = cache_dir / f"{key}.git"

    def _git(self, *args: str, repo: bool = True) -> bytes:
        cmd = ["git", *(["--git-dir", str(self.repo)] if repo else []), *args]
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_ASKPASS": "true"}
        try:
            done = subprocess.run(
                cmd, capture_output=True, env=env, timeout=GIT_TIMEOUT, check=False
            )
        except FileNotFoundError:
            raise PolicyError(["git is not installed (needed for git policy sources)"]) from None
        except subprocess.TimeoutExpired:
            raise PolicyError([f"{self.url}: git {args[0]} timed out"]) from None
        if done.returncode != 0:
            err = " ".join(done.stderr.decode("utf-8", "replace").split())[:300]
            raise PolicyError([f"{self.url}: git {args[0]} failed: {err or 'no output'}"])
        return done.stdout

    def fetch(self) -> None:
        if (self.repo / "HEAD").exists():
            self._git("fetch", "--prune", "--quiet", "origin")
        else:
            self.repo.parent.mkdir(parents=True, exist_ok=True)
            self._git("clone", "--mirror", "--quiet", "--", self.url, str(self.repo), repo=False)

    def resolve(self, ref: str) -> str:
        try:
            if ref.startswith("-"):  # an option, not a ref
                raise PolicyError([])
            out = self._git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        except PolicyError:
            raise PolicyError([f"{self.url}: unknown ref {ref!r}"]) from None
        return out.decode().strip()

    def list_files(self, sha: str, subdir: str = "") -> list[str]:
        check_sha(self.url, sha)
        subdir = subdir.strip("/")
        args = ["ls-tree", "-r", "-z", "--full-tree", sha, *(["--", subdir] if subdir else [])]
        paths = []
        for entry in self._git(*args).split(b"\0"):
            if not entry:
                continue
            meta, _, raw_path = entry.partition(b"\t")
            mode, kind, _obj = meta.decode().split()
            if kind == "blob" and mode != "120000":  # symlinks could point anywhere
                paths.append(raw_path.decode("utf-8", "replace"))
        return paths

    def read_file(self, sha: str, path: str) -> bytes:
        check_sha(self.url, sha)
        return self._git("cat-file", "blob", f"{sha}:{path}")


@dataclass
class _Commit:
    files: dict[str, bytes]


@dataclass
class InMemoryGit:
    """A `GitRepository` twin. `commit()` writes to "the remote"; reads see it after `fetch()`.

    The first branch committed to is the remote's default branch (HEAD)."""

    url: str = "memory://policy"
    default_branch: str | None = None
    _remote: dict[str, str] = field(default_factory=dict)  # branch -> sha, at "the remote"
    _refs: dict[str, str] = field(default_factory=dict)  # as of the last fetch, HEAD too
    _commits: dict[str, _Commit] = field(default_factory=dict)
    _fetched: set[str] = field(default_factory=set)
    fetches: int = 0

    def commit(self, files: Mapping[str, str | bytes | None], branch: str = "main") -> str:
        """A commit on `branch` changing `files` (None deletes one); its SHA."""
        parent = self._remote.get(branch)
        tree = dict(self._commits[parent].files) if parent else {}
        for path, content in files.items():
            if content is None:
                tree.pop(path, None)
            else:
                tree[path.strip("/")] = content.encode() if isinstance(content, str) else content
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update((parent or "").encode())
        for path in sorted(tree):
            digest.update(path.encode() + b"\0" + hashlib.sha1(tree[path]).digest())
        digest.update(str(len(self._commits)).encode())  # same tree twice: still a new commit
        sha = digest.hexdigest()
        self._commits[sha] = _Commit(tree)
        self._remote[branch] = sha
        self.default_branch = self.default_branch or branch
        return sha

    def fetch(self) -> None:
        self.fetches += 1
        self._refs = dict(self._remote)
        if self.default_branch is not None:
            self._refs["HEAD"] = self._remote[self.default_branch]
        self._fetched = set(self._commits)

    def resolve(self, ref: str) -> str:
        sha = self._refs.get(ref)
        if sha is None and _SHA.fullmatch(ref):
            matches = [c for c in self._fetched if c.startswith(ref)]
            sha = matches[0] if len(matches) == 1 else None
        if sha is None:
            raise PolicyError([f"{self.url}: unknown ref {ref!r}"])
        return sha

    def _tree(self, sha: str) -> dict[str, bytes]:
        check_sha(self.url, sha)
        if sha not in self._fetched:
            raise PolicyError([f"{self.url}: no commit {sha}"])
        return self._commits[sha].files

    def list_files(self, sha: str, subdir: str = "") -> list[str]:
        subdir = subdir.strip("/")
        prefix = f"{subdir}/" if subdir else ""
        return sorted(p for p in self._tree(sha) if p.startswith(prefix))

    def read_file(self, sha: str, path: str) -> bytes:
        try:
            return self._tree(sha)[path]
        except KeyError:
            raise PolicyError([f"{self.url}: no file {path!r} in {sha[:12]}"]) from None

"""Where policy comes from: a watched directory or a polled git ref.

Each source yields a `Candidate` (the files plus the version they should carry) whenever its
content changes; validation happens later, so a bad change never replaces the last good policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meshgate.adapters.git import GitCli, GitRepository
from meshgate.errors import MeshgateError, PolicyError
from meshgate.policy.gitsource import decode_policy_files, parse_git_source, policy_paths
from meshgate.policy.loader import LoadedPolicy, load_policy_texts_with_locations, read_policy_files
from meshgate.policy.model import PolicyModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    files: dict[str, str]
    version: str | None  # None: the loader derives a content hash
    origin: str  # "dir:/path" or the git commit, for status and logs
    root: Path  # what relative paths in the policy (caFile, secrets.path) are resolved against


@dataclass(frozen=True)
class SourceFailure:
    """The source itself could not be read (not a validation failure)."""

    problems: list[str]


class PolicySource(Protocol):
    description: str

    def changes(self) -> AsyncIterator[Candidate | SourceFailure]: ...


class InMemorySource:
    """The in-memory twin: policy files handed over in code (tests, embedding, a future API).

    `submit` queues a change; `fail` queues a source failure. Like the real sources it yields
    only what changed: the same files twice are one candidate."""

    def __init__(self, description: str = "memory") -> None:
        self.description = description
        self._queue: asyncio.Queue[Candidate | SourceFailure] = asyncio.Queue()

    def submit(self, files: dict[str, str], version: str | None = None) -> None:
        self._queue.put_nowait(Candidate(dict(files), version, self.description, Path(".")))

    def fail(self, *problems: str) -> None:
        self._queue.put_nowait(SourceFailure(list(problems)))

    async def changes(self) -> AsyncIterator[Candidate | SourceFailure]:
        last: tuple[str, str | None] | None = None
        while True:
            item = await self._queue.get()
            if isinstance(item, Candidate):
                key = (_digest(item.files), item.version)
                if key == last:
                    continue
                last = key
            yield item


class DirectorySource:
    """Polls a directory; cheap (a few file reads) and works on every filesystem."""

    def __init__(self, path: Path, interval: float = 0.25) -> None:
        self.path = path
        self.interval = interval
        self.description = f"dir:{path}"

    async def changes(self) -> AsyncIterator[Candidate | SourceFailure]:
        last: str | None = None
        while True:
            try:
                files = await asyncio.to_thread(read_policy_files, self.path)
                digest = _digest(files)
                if digest != last:
                    last = digest
                    yield Candidate(files, None, self.description, self.path.resolve())
            except PolicyError as exc:
                digest = "error:" + "\n".join(exc.problems)
                if digest != last:
                    last = digest
                    yield SourceFailure(exc.problems)
            await asyncio.sleep(self.interval)


class GitPolicySource:
    """Policy files at a ref (and subdirectory) of a git repository, read by commit SHA."""

    def __init__(self, repo: GitRepository, ref: str = "HEAD", subdir: str = "") -> None:
        self.repo = repo
        self.url = repo.url
        self.ref = ref
        self.subdir = subdir.strip("/")

    @classmethod
    def from_source(cls, source: str, cache_dir: Path) -> GitPolicySource:
        """`git+https://host/org/repo.git@main#sub` and the like, mirrored under `cache_dir`."""
        spec = parse_git_source(source)
        return cls(GitCli(spec.url, cache_dir), spec.ref, spec.subdir)

    def fetch(self) -> str:
        """Update from the remote; the full commit SHA `ref` points to."""
        self.repo.fetch()
        return self.repo.resolve(self.ref)

    def read_files(self, sha: str) -> dict[str, str]:
        """Policy files in commit `sha`, keyed by their path in the repository."""
        paths = policy_paths(self.repo.list_files(sha, self.subdir), self.subdir)
        blobs = {path: self.repo.read_file(sha, path) for path in paths}
        where = f"{self.subdir}/ in " if self.subdir else ""
        return decode_policy_files(blobs, f"{where}{self.url}@{sha[:12]}")

    def load_with_locations(self, sha: str) -> LoadedPolicy:
        files = self.read_files(sha)
        return load_policy_texts_with_locations(files, version=sha, root=self.subdir or self.url)

    def load(self, sha: str) -> PolicyModel:
        """The policy at commit `sha`; its version is the full SHA."""
        return self.load_with_locations(sha).model


class GitSource:
    """Polls a git ref; only committed content is served and the commit is the version."""

    def __init__(
        self,
        spec: str,
        cache_dir: Path,
        interval: float = 5.0,
        repo: GitRepository | None = None,
    ) -> None:
        """`repo`: the repository to read (tests pass `InMemoryGit`); by default a git CLI
        mirror of the URL in `spec` under `cache_dir`."""
        self.git = GitPolicySource.from_source(spec, cache_dir)
        if repo is not None:
            self.git = GitPolicySource(repo, self.git.ref, self.git.subdir)
        self.interval = interval
        self.description = spec
        self.cache_dir = cache_dir

    async def changes(self) -> AsyncIterator[Candidate | SourceFailure]:
        last: str | None = None
        while True:
            try:
                sha = await asyncio.to_thread(self.git.fetch)
                if sha != last:
                    files = await asyncio.to_thread(self.git.read_files, sha)
                    last = sha
                    yield Candidate(files, sha, f"git:{sha[:12]}", self.cache_dir)
            except MeshgateError as exc:
                problems = exc.problems if isinstance(exc, PolicyError) else [str(exc)]
                yield SourceFailure(problems)
            await asyncio.sleep(self.interval)


def make_source(spec: str, state_dir: Path, git_interval: float = 5.0) -> PolicySource:
    if spec.startswith("git+") or spec.endswith(".git") or "://" in spec:
        return GitSource(spec, state_dir / "git-cache", git_interval)
    return DirectorySource(Path(spec))


def _digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return h.hexdigest()

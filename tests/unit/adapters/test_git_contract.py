"""One contract, two git repositories: the git CLI on real repositories (`git init` in a tmp
dir) and the in-memory twin. Each test body runs against both."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import pytest

from meshgate.adapters.git import GitCli, GitRepository, InMemoryGit
from meshgate.errors import PolicyError

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
    "PATH": "/usr/bin:/bin:/usr/local/bin",
}


class Remote(Protocol):
    def commit(self, files: Mapping[str, str | None], branch: str = "main") -> str: ...


class RealRemote:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        self._git("init", "-q", "-b", "main")

    def _git(self, *args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(self.path), *args], env=GIT_ENV, capture_output=True, check=True
        )
        return done.stdout.decode().strip()

    def commit(self, files: Mapping[str, str | None], branch: str = "main") -> str:
        branches = self._git("branch", "--list", "--format=%(refname:short)").split()
        if branches:  # not the first commit: switch to `branch`, creating it from main
            self._git("checkout", "-q", *([] if branch in branches else ["-b"]), branch)
        for name, text in files.items():
            target = self.path / name
            if text is None:
                target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        self._git("add", "-A")
        self._git("commit", "-q", "--allow-empty", "-m", "c")
        sha = self._git("rev-parse", "HEAD")
        if branches:
            self._git("checkout", "-q", "main")
        return sha


@pytest.fixture(params=["git-cli", "in-memory"])
def git(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[GitRepository, Remote]]:
    if request.param == "git-cli":
        remote = RealRemote(tmp_path / "repo")
        yield GitCli(f"file://{remote.path}", tmp_path / "cache"), remote
    else:
        twin = InMemoryGit()
        yield twin, twin


def test_only_fetched_commits_are_visible(git: tuple[GitRepository, Remote]) -> None:
    repo, remote = git
    first = remote.commit({"mesh.yaml": "a: 1\n", "policies/agents.yaml": "b: 2\n"})
    repo.fetch()
    assert re.fullmatch(r"[0-9a-f]{40}", first)
    assert repo.resolve("main") == repo.resolve("HEAD") == first
    assert repo.resolve(first[:12]) == first
    second = remote.commit({"mesh.yaml": "a: 3\n", "policies/agents.yaml": None})
    assert repo.resolve("main") == first  # not fetched yet
    repo.fetch()
    assert repo.resolve("main") == second
    assert repo.list_files(second) == ["mesh.yaml"]
    assert repo.read_file(second, "mesh.yaml") == b"a: 3\n"
    # old commits stay readable
    assert sorted(repo.list_files(first)) == ["mesh.yaml", "policies/agents.yaml"]
    assert repo.read_file(first, "mesh.yaml") == b"a: 1\n"


def test_subdirectory_and_branches(git: tuple[GitRepository, Remote]) -> None:
    repo, remote = git
    sha = remote.commit(
        {"README.md": "hi", "policies/mesh.yaml": "m", "policies/sub/d.yml": "d", "pol.yaml": "x"}
    )
    other = remote.commit({"policies/mesh.yaml": "other"}, branch="staging")
    repo.fetch()
    assert sorted(repo.list_files(sha, "policies")) == ["policies/mesh.yaml", "policies/sub/d.yml"]
    assert repo.resolve("staging") == other and repo.resolve("HEAD") == sha
    assert repo.read_file(other, "policies/mesh.yaml") == b"other"


def test_unknown_refs_commits_and_bad_input_are_policy_errors(
    git: tuple[GitRepository, Remote],
) -> None:
    repo, remote = git
    remote.commit({"mesh.yaml": "m"})
    repo.fetch()
    with pytest.raises(PolicyError) as err:
        repo.resolve("nope")
    assert err.value.problems == [f"{repo.url}: unknown ref 'nope'"]
    with pytest.raises(PolicyError):
        repo.resolve("--output=/tmp/x")
    with pytest.raises(PolicyError) as err:
        repo.list_files("0" * 40)
    assert err.value.problems[0].startswith(f"{repo.url}: ")
    for bad in ("HEAD; rm -rf /", "--all", "main"):
        with pytest.raises(PolicyError) as err:
            repo.list_files(bad)
        assert err.value.problems == [f"{repo.url}: invalid commit {bad!r}"]
    with pytest.raises(PolicyError):
        repo.read_file(repo.resolve("main"), "missing.yaml")


def test_the_cli_skips_symlinks(tmp_path: Path) -> None:
    """The twin has no symlinks at all; the real repository's must never be read through."""
    remote = RealRemote(tmp_path / "repo")
    (remote.path / "secret.yaml").symlink_to("/etc/passwd")
    sha = remote.commit({"mesh.yaml": "m"})
    repo = GitCli(f"file://{remote.path}", tmp_path / "cache")
    repo.fetch()
    assert repo.list_files(sha) == ["mesh.yaml"]
    assert os.path.islink(remote.path / "secret.yaml")

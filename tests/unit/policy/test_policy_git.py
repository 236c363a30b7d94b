"""Git policy source against real repositories made with `git init` in tmp dirs."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from policy_texts import DESTS, MESH

from meshgate.adapters.git import GitCli, InMemoryGit
from meshgate.controlplane.sources import Candidate, GitPolicySource, GitSource
from meshgate.errors import PolicyError
from meshgate.policy.gitsource import GitSpec, parse_git_source, parse_git_url

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


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], env=GIT_ENV, capture_output=True, check=True
    )
    return done.stdout.decode().strip()


def commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    return r


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("git+file:///srv/policy@main", GitSpec("file:///srv/policy", "main")),
        ("git+file:///srv/policy", GitSpec("file:///srv/policy", "HEAD")),
        (
            "git+https://github.com/org/repo.git@v1.2",
            GitSpec("https://github.com/org/repo.git", "v1.2"),
        ),
        ("https://github.com/org/repo.git", GitSpec("https://github.com/org/repo.git", "HEAD")),
        (
            "git+ssh://git@github.com/org/repo.git@release/1",
            GitSpec("ssh://git@github.com/org/repo.git", "release/1"),
        ),
        ("git@github.com:org/repo.git@main", GitSpec("git@github.com:org/repo.git", "main")),
        (
            "git+file:///srv/mono@main#policies/prod",
            GitSpec("file:///srv/mono", "main", "policies/prod"),
        ),
    ],
)
def test_parse_git_source(source: str, expected: GitSpec) -> None:
    assert parse_git_source(source) == expected
    assert parse_git_url(source) == (expected.url, expected.ref)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "/srv/policy",
            "/srv/policy: not a git URL (expected e.g. git+file:///path/repo@main or git+https://host/org/repo.git@main)",
        ),
        ("git+ftp://host/repo", "git+ftp://host/repo: unsupported git URL scheme 'ftp'"),
        ("git+https://host", "git+https://host: git URL has no repository path"),
        ("git+file:///repo@-rf", "git+file:///repo@-rf: invalid git ref '-rf'"),
        ("git+file:///repo@a b", "git+file:///repo@a b: invalid git ref 'a b'"),
        ("git+file:///repo#../x", "git+file:///repo#../x: invalid subdirectory after '#'"),
    ],
)
def test_bad_git_sources(source: str, message: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse_git_source(source)
    assert e.value.problems == [message]


def test_valid_then_invalid_then_fixed(repo: Path, tmp_path: Path) -> None:
    source = GitPolicySource.from_source(f"git+file://{repo}@main", tmp_path / "cache")
    good = commit(repo, {"mesh.yaml": MESH, "dest.yaml": DESTS}, "valid")
    assert source.fetch() == good
    model = source.load(good)
    assert model.version == good
    assert [d.name for d in model.destinations] == ["raw", "search-api"]

    bad = commit(repo, {"dest.yaml": DESTS.replace("port: 443", "port: 0", 1)}, "break it")
    assert source.fetch() == bad
    with pytest.raises(PolicyError) as e:
        source.load(bad)
    assert e.value.problems == ["dest.yaml:6:9: port 0: must be between 1 and 65535"]
    assert source.load(good) == model  # old commits stay readable

    fixed = commit(repo, {"dest.yaml": DESTS}, "fix it")
    assert source.fetch() == fixed
    assert source.load(fixed) == dataclasses.replace(model, version=fixed)


def test_uncommitted_work_tree_edits_are_ignored(repo: Path, tmp_path: Path) -> None:
    sha = commit(repo, {"mesh.yaml": MESH, "dest.yaml": DESTS}, "valid")
    (repo / "dest.yaml").write_text("kind: [")  # modified, not committed
    (repo / "extra.yaml").write_text("kind: [")  # untracked
    source = GitPolicySource(GitCli(f"file://{repo}", tmp_path / "cache"))
    assert source.fetch() == sha
    assert set(source.read_files(sha)) == {"dest.yaml", "mesh.yaml"}
    assert source.load(sha).version == sha


def test_subdirectory_and_hidden_paths(repo: Path, tmp_path: Path) -> None:
    sha = commit(
        repo,
        {
            "README.md": "hi",
            "other.yaml": "kind: [",
            "policies/mesh.yaml": MESH,
            "policies/sub/dest.yml": DESTS,
            "policies/.github/ci.yaml": "kind: [",
        },
        "mono",
    )
    source = GitPolicySource.from_source(f"git+file://{repo}#policies", tmp_path / "cache")
    assert source.fetch() == sha
    assert list(source.read_files(sha)) == ["policies/mesh.yaml", "policies/sub/dest.yml"]
    assert source.load(sha).destinations


def test_unknown_ref(repo: Path, tmp_path: Path) -> None:
    commit(repo, {"mesh.yaml": MESH}, "c")
    source = GitPolicySource(GitCli(f"file://{repo}", tmp_path / "cache"), ref="nope")
    with pytest.raises(PolicyError) as e:
        source.fetch()
    assert e.value.problems == [f"file://{repo}: unknown ref 'nope'"]


def test_missing_repository(tmp_path: Path) -> None:
    source = GitPolicySource(GitCli(f"file://{tmp_path}/missing", tmp_path / "cache"))
    with pytest.raises(PolicyError) as e:
        source.fetch()
    [problem] = e.value.problems
    assert problem.startswith(f"file://{tmp_path}/missing: git clone failed: ")


def test_commit_without_policy_files(repo: Path, tmp_path: Path) -> None:
    sha = commit(repo, {"README.md": "hi"}, "c")
    source = GitPolicySource(GitCli(f"file://{repo}", tmp_path / "cache"))
    source.fetch()
    with pytest.raises(PolicyError) as e:
        source.load(sha)
    assert e.value.problems == [f"file://{repo}@{sha[:12]}: no *.yaml or *.yml policy files"]


def test_unknown_commit(repo: Path, tmp_path: Path) -> None:
    commit(repo, {"mesh.yaml": MESH}, "c")
    source = GitPolicySource(GitCli(f"file://{repo}", tmp_path / "cache"))
    source.fetch()
    with pytest.raises(PolicyError) as e:
        source.read_files("0" * 40)
    assert e.value.problems[0].startswith(f"file://{repo}: git ls-tree failed: ")
    with pytest.raises(PolicyError):
        source.read_files("HEAD; rm -rf /")


def test_policy_source_on_the_in_memory_twin() -> None:
    """The same policy reading (suffixes, hidden dirs, UTF-8, versions) over `InMemoryGit`."""
    twin = InMemoryGit("memory://policies")
    source = GitPolicySource(twin, ref="main", subdir="policies")
    sha = twin.commit(
        {
            "policies/mesh.yaml": MESH,
            "policies/dest.yml": DESTS,
            "policies/.github/ci.yaml": "kind: [",
            "policies/README.md": "hi",
            "other.yaml": "kind: [",
        }
    )
    assert source.fetch() == sha
    assert list(source.read_files(sha)) == ["policies/dest.yml", "policies/mesh.yaml"]
    assert source.load(sha).version == sha
    bad = twin.commit({"policies/mesh.yaml": b"\xff\xfe"})
    assert source.fetch() == bad
    with pytest.raises(PolicyError) as e:
        source.read_files(bad)
    assert e.value.problems == ["policies/mesh.yaml: not valid UTF-8 text"]
    empty = twin.commit({"policies/mesh.yaml": None, "policies/dest.yml": None})
    source.fetch()
    with pytest.raises(PolicyError) as e:
        source.read_files(empty)
    assert e.value.problems == [
        f"policies/ in memory://policies@{empty[:12]}: no *.yaml or *.yml policy files"
    ]


async def test_git_source_polls_the_twin(tmp_path: Path) -> None:
    twin = InMemoryGit("memory://policies")
    first = twin.commit({"mesh.yaml": MESH, "dest.yaml": DESTS})
    source = GitSource("git+https://example.invalid/p.git@main", tmp_path, 0.01, repo=twin)
    changes = source.changes()
    candidate = await anext(changes)
    assert isinstance(candidate, Candidate) and candidate.version == first
    second = twin.commit({"dest.yaml": DESTS.replace("443", "8443", 1)})
    candidate = await anext(changes)
    assert isinstance(candidate, Candidate) and candidate.version == second
    assert candidate.origin == f"git:{second[:12]}"
    await changes.aclose()  # type: ignore[attr-defined]

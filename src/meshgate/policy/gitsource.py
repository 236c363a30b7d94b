"""Policy from a git repository: the pure part (source strings, which files are policy).

Policy is read only from commits, never a work tree, so a policy version is a commit SHA: what
runs is exactly what was reviewed and merged. Git itself is run by `meshgate.adapters.git`.
Sources look like `git+file:///srv/policy@main`, `git+https://host/org/repo.git@v1.2`,
`git+ssh://git@host/org/repo.git@main` or `git@host:org/repo.git@main`; `#sub/dir` selects a
subdirectory. The ref defaults to `HEAD` (the remote's default branch).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshgate.errors import PolicyError
from meshgate.policy.loader import POLICY_SUFFIXES

_SCP = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:")
_REF = re.compile(r"^[A-Za-z0-9._/-]+$")


@dataclass(frozen=True)
class GitSpec:
    url: str
    ref: str = "HEAD"
    subdir: str = ""


def parse_git_source(source: str) -> GitSpec:
    """Parse a policy source string into url, ref and subdirectory; PolicyError if malformed."""
    s = source.strip()
    subdir = ""
    if "#" in s:
        s, subdir = s.split("#", 1)
        subdir = subdir.strip("/")
        if not subdir or ".." in subdir.split("/"):
            raise PolicyError([f"{source}: invalid subdirectory after '#'"])
    if s.startswith("git+"):
        s = s[4:]
    if "://" in s:
        scheme, rest = s.split("://", 1)
        if scheme not in ("file", "https", "http", "ssh", "git"):
            raise PolicyError([f"{source}: unsupported git URL scheme {scheme!r}"])
        slash = rest.find("/")
        if slash < 0 and scheme != "file":
            raise PolicyError([f"{source}: git URL has no repository path"])
        head, path = (rest[:slash], rest[slash:]) if slash >= 0 else ("", rest)
        path, ref = _split_ref(path)
        url = f"{scheme}://{head}{path}"
        if not path.strip("/"):
            raise PolicyError([f"{source}: git URL has no repository path"])
    elif _SCP.match(s):
        host, path = s.split(":", 1)
        path, ref = _split_ref(path)
        if not path:
            raise PolicyError([f"{source}: git URL has no repository path"])
        url = f"{host}:{path}"
    else:
        raise PolicyError(
            [
                f"{source}: not a git URL (expected e.g. git+file:///path/repo@main or "
                "git+https://host/org/repo.git@main)"
            ]
        )
    if not _REF.match(ref) or ref.startswith("-") or ".." in ref:
        raise PolicyError([f"{source}: invalid git ref {ref!r}"])
    return GitSpec(url, ref, subdir)


def _split_ref(path: str) -> tuple[str, str]:
    if "@" in path:
        path, ref = path.rsplit("@", 1)
        return path, ref
    return path, "HEAD"


def parse_git_url(source: str) -> tuple[str, str]:
    """`git+file:///path/repo@main` -> ("file:///path/repo", "main"); ref defaults to HEAD."""
    spec = parse_git_source(source)
    return spec.url, spec.ref


def policy_paths(paths: Iterable[str], subdir: str = "") -> list[str]:
    """The policy files among a commit's regular files (paths from the repository root):
    `*.yaml`/`*.yml` under `subdir`, none inside a hidden directory below it."""
    prefix = f"{subdir}/" if subdir else ""
    selected = []
    for path in paths:
        if not path.startswith(prefix) or not path.endswith(POLICY_SUFFIXES):
            continue
        if any(part.startswith(".") for part in path[len(prefix) :].split("/")):
            continue
        selected.append(path)
    return sorted(selected)


def decode_policy_files(blobs: Mapping[str, bytes], where: str) -> dict[str, str]:
    """Policy file contents as text; PolicyError naming every file that is not UTF-8, or when
    there is none at all (`where`: the repository, ref and subdirectory, for that message)."""
    files: dict[str, str] = {}
    problems: list[str] = []
    for path in sorted(blobs):
        try:
            files[path] = blobs[path].decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"{path}: not valid UTF-8 text")
    if problems:
        raise PolicyError(problems)
    if not files:
        raise PolicyError([f"{where}: no *.yaml or *.yml policy files"])
    return files

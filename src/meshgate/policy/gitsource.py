"""Policy from a git repository, read only from commits (never a work tree), via the git CLI.

A policy version is then a commit SHA: what runs is exactly what was reviewed and merged.
Sources look like `git+file:///srv/policy@main`, `git+https://host/org/repo.git@v1.2`,
`git+ssh://git@host/org/repo.git@main` or `git@host:org/repo.git@main`; `#sub/dir` selects a
subdirectory. The ref defaults to `HEAD` (the remote's default branch).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from meshgate.errors import PolicyError
from meshgate.policy.loader import POLICY_SUFFIXES, LoadedPolicy, load_policy_texts_with_locations
from meshgate.policy.model import PolicyModel

GIT_TIMEOUT = 120.0
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


class GitPolicySource:
    """A mirror clone in `cache_dir`, refreshed by `fetch()`, read by commit SHA."""

    def __init__(self, url: str, cache_dir: Path, ref: str = "HEAD", subdir: str = "") -> None:
        self.url = url
        self.ref = ref
        self.subdir = subdir.strip("/")
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        self.repo = cache_dir / f"{key}.git"

    @classmethod
    def from_source(cls, source: str, cache_dir: Path) -> GitPolicySource:
        spec = parse_git_source(source)
        return cls(spec.url, cache_dir, spec.ref, spec.subdir)

    def _git(self, *args: str, input_bytes: bytes | None = None, repo: bool = True) -> bytes:
        cmd = ["git", *(["--git-dir", str(self.repo)] if repo else []), *args]
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_ASKPASS": "true"}
        try:
            done = subprocess.run(
                cmd,
                input=input_bytes,
                capture_output=True,
                env=env,
                timeout=GIT_TIMEOUT,
                check=False,
            )
        except FileNotFoundError:
            raise PolicyError(["git is not installed (needed for git policy sources)"]) from None
        except subprocess.TimeoutExpired:
            raise PolicyError([f"{self.url}: git {args[0]} timed out"]) from None
        if done.returncode != 0:
            err = " ".join(done.stderr.decode("utf-8", "replace").split())[:300]
            raise PolicyError([f"{self.url}: git {args[0]} failed: {err or 'no output'}"])
        return done.stdout

    def fetch(self) -> str:
        """Clone or update the mirror; return the full commit SHA that `ref` points to."""
        if (self.repo / "HEAD").exists():
            self._git("fetch", "--prune", "--quiet", "origin")
        else:
            self.repo.parent.mkdir(parents=True, exist_ok=True)
            self._git("clone", "--mirror", "--quiet", "--", self.url, str(self.repo), repo=False)
        try:
            out = self._git("rev-parse", "--verify", "--quiet", f"{self.ref}^{{commit}}")
        except PolicyError:
            raise PolicyError([f"{self.url}: unknown ref {self.ref!r}"]) from None
        return out.decode().strip()

    def read_files(self, sha: str) -> dict[str, str]:
        """Policy files in commit `sha`, keyed by their path in the repository."""
        if not re.fullmatch(r"[0-9a-f]{4,64}", sha):
            raise PolicyError([f"{self.url}: invalid commit {sha!r}"])
        args = ["ls-tree", "-r", "-z", "--full-tree", sha]
        listing = self._git(*args, *(["--", self.subdir] if self.subdir else []))
        blobs: list[tuple[str, str]] = []
        for entry in listing.split(b"\0"):
            if not entry:
                continue
            meta, _, raw_path = entry.partition(b"\t")
            mode, kind, obj = meta.decode().split()
            path = raw_path.decode("utf-8", "replace")
            rel = path[len(self.subdir) + 1 :] if self.subdir else path
            if kind != "blob" or mode == "120000" or not path.endswith(POLICY_SUFFIXES):
                continue
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            blobs.append((path, obj))
        files: dict[str, str] = {}
        problems: list[str] = []
        for path, obj in sorted(blobs):
            data = self._git("cat-file", "blob", obj)
            try:
                files[path] = data.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{path}: not valid UTF-8 text")
        if problems:
            raise PolicyError(problems)
        if not files:
            where = f"{self.subdir}/ in " if self.subdir else ""
            raise PolicyError([f"{where}{self.url}@{sha[:12]}: no *.yaml or *.yml policy files"])
        return files

    def load_with_locations(self, sha: str) -> LoadedPolicy:
        files = self.read_files(sha)
        return load_policy_texts_with_locations(files, version=sha, root=self.subdir or self.url)

    def load(self, sha: str) -> PolicyModel:
        """The policy at commit `sha`; its version is the full SHA."""
        return self.load_with_locations(sha).model

"""Public entry points: policy texts or a directory in, a validated PolicyModel (or every problem)
out.

`load_policy_texts` is pure: it takes {display path: YAML text}, so the same code serves a working
directory, a git commit and tests. It raises only `PolicyError`, whatever the input. The
`*_with_locations` variants also return a `SourceMap` ("file:line" of each destination, agent and
rule), which the compiled model deliberately doesn't carry; lint uses it for finding locations.

Parsing and checking a file depends only on its display path and text, so those per-file results
are cached, keyed on (display path, sha256 of the text): reloading a policy where one file changed
re-parses only that file. Cross-document compilation always runs over every file, but reuses the
compiled rules of unchanged documents whose destinations are unchanged too. The cache keeps
only the files of the latest load, so it is bounded by the size of one policy; cached objects are
never handed to callers (the model and source map are built afresh by every load).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshgate.errors import PolicyError
from meshgate.policy.compile import RuleMemo, SourceMap, compile_documents
from meshgate.policy.documents import CheckedDoc, check_document
from meshgate.policy.model import PolicyModel
from meshgate.policy.problems import Pos, Problem, render_problems
from meshgate.policy.yamlsource import parse_documents

POLICY_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LoadedPolicy:
    model: PolicyModel
    sources: SourceMap


@dataclass(frozen=True)
class _FileResult:
    """What one file contributes to a load: its checked documents and problems. `complete` is
    False when the file may hide documents (a YAML error, or a document of unknown kind)."""

    checked: tuple[CheckedDoc, ...]
    problems: tuple[Problem, ...]
    complete: bool


_CacheKey = tuple[str, bytes]


class _FileCache:
    """Per-file results of the latest load. Thread-safe: loads run on worker threads; two
    concurrent loads may each miss, never see a wrong entry (the key pins path and text)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[_CacheKey, _FileResult] = {}

    def get(self, key: _CacheKey) -> _FileResult | None:
        with self._lock:
            return self._entries.get(key)

    def keep_only(self, entries: dict[_CacheKey, _FileResult]) -> None:
        """Replace the contents with `entries` (the files of the load that just finished)."""
        with self._lock:
            self._entries = dict(entries)

    def clear(self) -> None:
        with self._lock:
            self._entries = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


_CACHE = _FileCache()
_RULES = RuleMemo()  # compiled rules of the cached documents (see compile.RuleMemo)


def clear_policy_cache() -> None:
    """Forget cached per-file results and compiled rules (tests; or to release memory)."""
    _CACHE.clear()
    _RULES.clear()


def _cache_key(display: str, text: str) -> _CacheKey:
    return display, hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _load_file(display: str, text: str) -> _FileResult:
    """Parse and schema-check every document of one file."""
    docs, yaml_problems = parse_documents(display, text)
    problems = list(yaml_problems)
    complete = not yaml_problems
    checked: list[CheckedDoc] = []
    for doc in docs:
        result, doc_problems = check_document(doc)
        problems += doc_problems
        if result is not None:
            checked.append(result)
        elif doc_problems:
            complete = False  # unknown kind: a Mesh or destination may be hiding in it
    return _FileResult(tuple(checked), tuple(problems), complete)


def content_version(files: Mapping[str, str]) -> str:
    """First 12 hex of sha256 over the sorted (path, text) pairs: order-independent."""
    h = hashlib.sha256()
    for path, text in sorted(files.items()):
        for part in (path, text):
            data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else bytes(part)
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
    return h.hexdigest()[:12]


def load_policy_texts(
    files: Mapping[str, str], version: str | None = None, root: str | None = None
) -> PolicyModel:
    """Validate and compile policy texts; raise PolicyError listing every problem found."""
    return load_policy_texts_with_locations(files, version, root).model


def load_policy_texts_with_locations(
    files: Mapping[str, str], version: str | None = None, root: str | None = None
) -> LoadedPolicy:
    """Like `load_policy_texts`, plus where each destination, agent and rule was written.

    `root` names the policy as a whole in problems that have no single file (a missing Mesh);
    by default it is the common directory of the file paths.
    """
    try:
        return _load(files, version, root)
    except PolicyError:
        raise
    except RecursionError:
        raise PolicyError([f"{root or '.'}: policy is nested too deeply"]) from None
    except Exception as e:  # a bug of ours must still not surface as a traceback to a user
        raise PolicyError([f"{root or '.'}: internal error while loading policy: {e!r}"]) from e


def _load(files: Mapping[str, str], version: str | None, root: str | None) -> LoadedPolicy:
    problems: list[Problem] = []
    checked: list[CheckedDoc] = []
    complete = True
    texts: dict[str, str] = {}
    used: dict[_CacheKey, _FileResult] = {}
    for path in sorted(files, key=str):
        text = files[path]
        display = str(path)
        if isinstance(text, bytes | bytearray):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                problems.append(Problem(Pos(display), "not valid UTF-8 text"))
                complete = False
                continue
        if not isinstance(text, str):
            problems.append(Problem(Pos(display), "not text"))
            complete = False
            continue
        texts[display] = text
        key = _cache_key(display, text)
        file_result = used.get(key) or _CACHE.get(key)
        if file_result is None:
            file_result = _load_file(display, text)
        used[key] = file_result
        problems += file_result.problems
        checked += file_result.checked
        complete = complete and file_result.complete
    _CACHE.keep_only(used)
    root = root or _common_root(list(files))
    if version is None:
        # names relative to the policy's root: `policies`, `./policies` and `/abs/policies`
        # holding the same files are the same version
        version = content_version({_relative(name, root): text for name, text in texts.items()})
    model, sources, compile_problems = compile_documents(checked, complete, root, version, _RULES)
    problems += compile_problems
    if problems or model is None:
        raise PolicyError(render_problems(problems) or ["policy could not be compiled"])
    return LoadedPolicy(model, sources)


def _relative(name: str, root: str) -> str:
    try:
        return Path(os.path.relpath(name, root)).as_posix()
    except ValueError:  # not under it (another drive): the name as given
        return name


def _common_root(paths: list[object]) -> str:
    dirs = [os.path.dirname(str(p)) for p in paths]
    try:
        common = os.path.commonpath(dirs) if dirs else ""
    except ValueError:  # a mix of absolute and relative paths
        common = ""
    return common or "."


def read_policy_files(path: Path) -> dict[str, str]:
    """Every *.yaml / *.yml under `path` (recursively, sorted, hidden dirs and files skipped),
    keyed by display path (`path` joined with the relative name, so relative stays relative)."""
    if not path.is_dir():
        raise PolicyError([f"{path}: not a readable directory"])
    found: list[Path] = []
    errors: list[str] = []

    def walk_error(e: OSError) -> None:
        errors.append(f"{e.filename or path}: cannot read: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(path, onerror=walk_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.endswith(POLICY_SUFFIXES):
                found.append(Path(dirpath) / name)
    files: dict[str, str] = {}
    for file in sorted(found):
        try:
            files[str(file)] = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            errors.append(f"{file}: not valid UTF-8 text")
        except OSError as e:
            errors.append(f"{file}: cannot read: {e.strerror or e}")
    if errors:
        raise PolicyError(sorted(errors))
    if not files:
        raise PolicyError([f"{path}: no *.yaml or *.yml policy files found"])
    return files


def load_policy_dir(path: Path, version: str | None = None) -> PolicyModel:
    """Load every policy file under `path`; version defaults to a hash of their contents."""
    return load_policy_dir_with_locations(path, version).model


def load_policy_dir_with_locations(path: Path, version: str | None = None) -> LoadedPolicy:
    return load_policy_texts_with_locations(read_policy_files(path), version, root=str(path))

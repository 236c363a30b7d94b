"""Public entry points: policy texts or a directory in, a validated PolicyModel (or every problem)
out.

`load_policy_texts` is pure: it takes {display path: YAML text}, so the same code serves a working
directory, a git commit and tests. It raises only `PolicyError`, whatever the input. The
`*_with_locations` variants also return a `SourceMap` ("file:line" of each destination, agent and
rule), which the compiled model deliberately doesn't carry; lint uses it for finding locations.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshgate.errors import PolicyError
from meshgate.policy.compile import SourceMap, compile_documents
from meshgate.policy.documents import CheckedDoc, check_document
from meshgate.policy.model import PolicyModel
from meshgate.policy.problems import Pos, Problem, render_problems
from meshgate.policy.yamlsource import parse_documents

POLICY_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LoadedPolicy:
    model: PolicyModel
    sources: SourceMap


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
        docs, yaml_problems = parse_documents(display, text)
        if yaml_problems:
            complete = False
            problems += yaml_problems
        for doc in docs:
            result, doc_problems = check_document(doc)
            problems += doc_problems
            if result is not None:
                checked.append(result)
            elif doc_problems:
                complete = False  # unknown kind: a Mesh or destination may be hiding in it
    if version is None:
        version = content_version(texts)
    model, sources, compile_problems = compile_documents(
        checked, complete, root or _common_root(list(files)), version
    )
    problems += compile_problems
    if problems or model is None:
        raise PolicyError(render_problems(problems) or ["policy could not be compiled"])
    return LoadedPolicy(model, sources)


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

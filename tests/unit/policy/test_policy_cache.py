"""The per-file cache of parsed and checked documents: a reload re-parses only what changed, and
gives exactly what a load without the cache gives, whatever edits, deletions and renames came
before and whatever a caller did to the objects an earlier load returned."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from policy_texts import DESTS, HEAD, MESH, R, agent

from meshgate.errors import PolicyError
from meshgate.policy import loader
from meshgate.policy.loader import clear_policy_cache, load_policy_texts_with_locations

AGENTS = agent("researcher", R + "      methods: [GET]\n") + "---\n" + agent("coder", R)
GROUP = (
    HEAD + "kind: AgentGroup\nmetadata: {name: g}\nspec:\n  agents: [researcher, coder]\n"
    "  egress:\n    - destination: raw\n"
)


def _outcome(files: dict[str, Any]) -> Any:
    """Everything a load tells its caller: the model and source map, or the problems."""
    try:
        loaded = load_policy_texts_with_locations(files)
    except PolicyError as e:
        return ("error", list(e.problems))
    return ("ok", loaded.model, loaded.sources)


@contextmanager
def _empty_cache() -> Iterator[None]:
    """Run with a fresh, empty cache and put the warm one back afterwards."""
    saved = loader._CACHE
    loader._CACHE = loader._FileCache()
    try:
        yield
    finally:
        loader._CACHE = saved


def _fresh(files: dict[str, Any]) -> Any:
    with _empty_cache():
        return _outcome(files)


@pytest.fixture(autouse=True)
def _clean_cache() -> Iterator[None]:
    clear_policy_cache()
    yield
    clear_policy_cache()


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The display paths parse_documents was called for, in order."""
    calls: list[str] = []
    real = loader.parse_documents

    def spy(file: str, text: str) -> Any:
        calls.append(file)
        return real(file, text)

    monkeypatch.setattr(loader, "parse_documents", spy)
    return calls


def _steps() -> list[dict[str, Any]]:
    """A history of a policy repository: edits, breakage, fixes, deletions and renames."""
    v1 = {"p/mesh.yaml": MESH, "p/dest.yaml": DESTS, "p/agents.yaml": AGENTS}
    v2 = dict(v1, **{"p/agents.yaml": AGENTS.replace("[GET]", "[GET, POST]")})
    v3 = dict(v2, **{"p/group.yaml": GROUP})
    v4 = dict(v3, **{"p/agents.yaml": AGENTS.replace("[GET]", "[get]")})  # a schema error
    v5 = dict(v4, **{"p/dest.yaml": DESTS + "  port: 80\n"})  # a duplicate key
    v6 = dict(v5, **{"p/dest.yaml": DESTS, "p/agents.yaml": v2["p/agents.yaml"]})  # fixed
    v7 = {k: v for k, v in v6.items() if k != "p/group.yaml"}  # deleted
    v8 = {("p/renamed.yaml" if k == "p/agents.yaml" else k): v for k, v in v7.items()}
    v9 = dict(v8, **{"p/copy.yaml": v8["p/renamed.yaml"]})  # same text, another path
    v10 = {k: v for k, v in v9.items() if k != "p/mesh.yaml"}  # no Mesh
    v11 = dict(v10, **{"p/mesh.yaml": MESH.encode()})  # bytes, as a git source may deliver
    v12 = dict(v11, **{"p/copy.yaml": "kind: ["})  # a syntax error hides the duplicates
    v13 = dict(v12, **{"p/copy.yaml": b"\xff"})
    return [v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v1]


def test_cached_loads_equal_fresh_loads_through_edits_deletions_and_renames() -> None:
    for i, files in enumerate(_steps()):
        cached = _outcome(files)
        assert cached == _fresh(files), f"step {i + 1}"
        assert _outcome(files) == cached, f"step {i + 1}, loaded again"


def test_only_changed_and_renamed_files_are_parsed_again(parses: list[str]) -> None:
    files = {"p/mesh.yaml": MESH, "p/dest.yaml": DESTS, "p/agents.yaml": AGENTS}
    _outcome(files)
    assert sorted(parses) == ["p/agents.yaml", "p/dest.yaml", "p/mesh.yaml"]
    parses.clear()
    _outcome(dict(files))
    assert parses == []
    files["p/agents.yaml"] = AGENTS.replace("[GET]", "[PUT]")
    _outcome(files)
    assert parses == ["p/agents.yaml"]
    parses.clear()
    files["p/group.yaml"] = GROUP
    _outcome(files)
    assert parses == ["p/group.yaml"]
    parses.clear()
    del files["p/group.yaml"]
    _outcome(files)
    assert parses == []
    files["p/renamed.yaml"] = files.pop("p/agents.yaml")
    _outcome(files)  # positions name the file, so a renamed file is parsed again
    assert parses == ["p/renamed.yaml"]
    parses.clear()
    files["p/group.yaml"] = GROUP  # dropped from the cache when it was deleted
    _outcome(files)
    assert parses == ["p/group.yaml"]


def test_the_cache_holds_only_the_latest_load() -> None:
    steps = _steps()
    _outcome(steps[2])
    assert len(loader._CACHE) == 4
    _outcome(steps[6])
    assert len(loader._CACHE) == 3
    _outcome({"q/mesh.yaml": MESH})
    assert len(loader._CACHE) == 1


def test_mutating_returned_objects_does_not_poison_the_cache() -> None:
    files = _steps()[0]
    loaded = load_policy_texts_with_locations(files)
    loaded.sources.destinations.clear()
    loaded.sources.agents["researcher"] = "elsewhere:1"
    loaded.sources.rules.clear()
    broken = dict(files, **{"p/agents.yaml": AGENTS.replace("[GET]", "[get]")})
    with pytest.raises(PolicyError) as e:
        load_policy_texts_with_locations(broken)
    e.value.problems.clear()
    e.value.problems.append("nonsense")
    assert _outcome(broken) == _fresh(broken)
    assert _outcome(files) == _fresh(files)


def test_concurrent_loads_of_different_policies_stay_correct() -> None:
    steps = _steps()
    expected = [_fresh(files) for files in steps]
    failures: list[str] = []

    def worker(offset: int) -> None:
        for round_ in range(5):
            for j in range(len(steps)):
                i = (j + offset + round_) % len(steps)
                if _outcome(steps[i]) != expected[i]:
                    failures.append(f"step {i + 1}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []

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
from meshgate.policy import compile as compile_module
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


# -- compiled rules of unchanged documents -----------------------------------------------------

GROUP_SEARCH = (
    HEAD + "kind: AgentGroup\nmetadata: {name: g}\nspec:\n  agents: [a1, a2]\n"
    "  egress:\n    - destination: search-api\n      paths: [/x]\n"
)
DEFAULT = (
    HEAD + "kind: DefaultPolicy\nmetadata: {name: everyone}\nspec:\n  egress:\n"
    "    - destination: search-api\n      methods: [POST]\n"
)
RAW_NONE = DESTS.replace("  tls: passthrough\n", "  tls: none\n")
SEARCH_PASSTHROUGH = RAW_NONE.replace("  port: 443\n---", "  port: 443\n  tls: passthrough\n---", 1)


def _rule_steps() -> list[dict[str, Any]]:
    """Edits to destinations and to unrelated files only: the agent, group and default files
    stay untouched (except in v2), yet their rule problems change."""
    v1 = {
        "p/mesh.yaml": MESH,
        "p/dest.yaml": RAW_NONE,
        "p/a1.yaml": agent("a1", R + "      methods: [GET]\n"),
        "p/a2.yaml": agent("a2", "    - destination: raw\n      methods: [GET]\n"),
        "p/group.yaml": GROUP_SEARCH,
        "p/default.yaml": DEFAULT,
    }
    # duplicates in a list: problems that depend on the document alone
    v2 = dict(v1, **{"p/a1.yaml": agent("a1", R + "      methods: [GET]\n      tools: [t, t]\n")})
    # search-api becomes passthrough: methods and paths of a1, the group and the default
    # rule cannot apply any more
    v3 = dict(v1, **{"p/dest.yaml": SEARCH_PASSTHROUGH})
    # ... and is rejected (credentials with passthrough), so it is no longer compiled at all
    creds = "  credentials: {header: Authorization, secret: k}\n"
    v4 = dict(v1, **{"p/dest.yaml": SEARCH_PASSTHROUGH.replace("---", creds + "---", 1)})
    # raw becomes passthrough: a2's methods cannot apply
    v5 = dict(v1, **{"p/dest.yaml": DESTS})
    # search-api renamed: unknown destination, with a hint, in untouched files
    v6 = dict(v1, **{"p/dest.yaml": RAW_NONE.replace("name: search-api", "name: search-apis")})
    # raw removed
    v7 = dict(v1, **{"p/dest.yaml": RAW_NONE.split("---")[0]})
    # an unrelated broken file: the policy is incomplete, unknown references are not reported
    v8 = dict(v7, **{"p/broken.yaml": "kind: ["})
    v9 = dict(v7, **{"p/broken.yaml": HEAD + "kind: Nonsense\nmetadata: {name: x}\n"})
    v10 = dict(v6, **{"p/broken.yaml": "kind: ["})
    v11 = dict(v8, **{"p/mesh.yaml": MESH.encode()})
    v12 = dict(v2, **{"p/dest.yaml": SEARCH_PASSTHROUGH})
    # raw is still missing, but a destination named like it appears: only the hint changes
    rawx = (
        "---\n"
        + HEAD
        + "kind: Destination\nmetadata: {name: rawx}\nspec: {host: x.example, port: 443}\n"
    )
    v13 = dict(v7, **{"p/dest.yaml": v7["p/dest.yaml"] + rawx})
    return [
        *(v1, v2, v3, v1, v4, v1, v5, v1, v6, v7, v8, v7, v9, v7, v10, v6, v11, v3, v4, v12, v2),
        *(v7, v13, v7, v10, v13),
    ]


def test_memoised_rules_equal_fresh_compiles_when_only_destinations_or_others_change() -> None:
    steps = _rule_steps()
    expected = []
    for files in steps:
        clear_policy_cache()
        expected.append(_outcome(files))
    assert expected[0][0] == "ok"
    assert {e[0] for e in expected} == {"ok", "error"}
    assert len({repr(e) for e in expected}) >= 8  # the steps really differ from each other
    clear_policy_cache()
    for i, files in enumerate(steps):
        cached = _outcome(files)
        assert cached == expected[i], f"step {i + 1}"
        assert _outcome(files) == cached, f"step {i + 1}, loaded again"


def test_memoised_problem_texts_and_positions() -> None:
    steps = _rule_steps()
    _outcome(steps[1])
    got = _outcome(steps[19])  # v12
    assert got[0] == "error"
    assert [p.split(": ", 1)[0] for p in got[1]] == [
        "p/a1.yaml:8:7",
        "p/a1.yaml:9:7",
        "p/a1.yaml:9:18",
        "p/default.yaml:7:7",
        "p/group.yaml:8:7",
    ]
    assert 'methods cannot apply: destination "search-api" uses tls: passthrough' in got[1][0]
    assert 'tools[1] "t" is listed twice' in got[1][2]
    clear_policy_cache()
    assert _outcome(steps[19]) == got


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files whose rules were compiled (not taken from the memo), in order."""
    calls: list[str] = []
    real = compile_module._Compiler._compile_rules

    def spy(self: Any, src: Any, base: Any, docs: Any) -> Any:
        calls.append(src.file)
        return real(self, src, base, docs)

    monkeypatch.setattr(compile_module._Compiler, "_compile_rules", spy)
    return calls


def test_only_affected_rules_are_compiled_again(compiles: list[str]) -> None:
    steps = _rule_steps()
    v1 = steps[0]
    _outcome(v1)
    assert sorted(compiles) == ["p/a1.yaml", "p/a2.yaml", "p/default.yaml", "p/group.yaml"]
    compiles.clear()
    _outcome(dict(v1))
    assert compiles == []
    _outcome(dict(v1, **{"p/a2.yaml": agent("a2", "    - destination: raw\n      paths: [/]\n")}))
    assert compiles == ["p/a2.yaml"]
    compiles.clear()
    _outcome(steps[2])  # search-api's tls: only the files with rules for it (a2 edited back)
    assert sorted(compiles) == ["p/a1.yaml", "p/a2.yaml", "p/default.yaml", "p/group.yaml"]
    _outcome(steps[3])
    compiles.clear()
    _outcome(steps[6])  # raw's tls: only a2
    assert compiles == ["p/a2.yaml"]
    compiles.clear()
    _outcome(steps[8])  # a renamed destination changes every hint
    assert len(compiles) == 4
    compiles.clear()
    clear_policy_cache()
    _outcome(steps[8])
    assert len(compiles) == 4
    assert len(loader._RULES) == 4  # bounded by the documents of the latest load
    clear_policy_cache()
    assert len(loader._RULES) == 0

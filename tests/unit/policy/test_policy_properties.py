"""Whatever text or structure comes in, loading fails only with PolicyError (or succeeds)."""

from __future__ import annotations

import io
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_texts import DESTS, MESH
from ruamel.yaml import YAML

from meshgate.errors import PolicyError
from meshgate.policy.loader import load_policy_texts
from meshgate.policy.model import PolicyModel
from meshgate.policy.schema import KINDS

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELD_NAMES = [
    "apiVersion", "kind", "metadata", "spec", "name", "labels", "host", "port", "tls", "address",
    "caFile", "identity", "credentials", "header", "secret", "format", "agent", "agents",
    "egress", "destination", "methods", "paths", "headers", "tools", "rateLimit", "requests",
    "per", "trustDomain", "egressGateway", "listenPort", "secrets", "provider", "path", "value",
]  # fmt: skip
VALUES = [
    "meshgate.dev/v1", *KINDS, "search-api", "raw", "GET", "get", "/v1/*", "1m", "1y", "{secret}",
    "originate", "passthrough", "none", "jwt", "file", "vault", "env", "10.0.0.1:80", "*.a.b",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(VALUES),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8))
structures = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=6)),
    max_leaves=30,
)


def _policy_shaped(kind: str, spec: Any, name: Any) -> dict[str, Any]:
    return {"apiVersion": "meshgate.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


policy_docs = st.builds(
    _policy_shaped,
    st.sampled_from(KINDS),
    st.dictionaries(st.sampled_from(FIELD_NAMES), structures, max_size=6),
    st.one_of(st.sampled_from(["search-api", "raw", "x", "default"]), scalars),
)


def _dump(docs: list[Any]) -> str:
    out = io.StringIO()
    YAML().dump_all(docs, out)
    return out.getvalue()


def _load_only_policy_error(files: dict[str, str]) -> PolicyModel | None:
    try:
        return load_policy_texts(files)
    except PolicyError as e:
        assert e.problems, "a PolicyError must carry at least one problem"
        assert all(isinstance(p, str) and p for p in e.problems)
        # the loader's last-resort wrapper for our own bugs must never be what answered
        assert not any("internal error" in p for p in e.problems), e.problems
        return None


@SETTINGS
@given(st.text(max_size=400))
def test_arbitrary_text_raises_only_policy_error(text: str) -> None:
    _load_only_policy_error({"p/a.yaml": text})


@SETTINGS
@given(st.text(alphabet=" \t\n-:[]{}&*!|>'\"%@`#,?abc01", max_size=200))
def test_yaml_punctuation_soup_raises_only_policy_error(text: str) -> None:
    _load_only_policy_error({"p/mesh.yaml": MESH, "p/a.yaml": text})


@SETTINGS
@given(st.lists(structures, min_size=1, max_size=3))
def test_arbitrary_yaml_structures_raise_only_policy_error(docs: list[Any]) -> None:
    _load_only_policy_error({"p/mesh.yaml": MESH, "p/a.yaml": _dump(docs)})


@SETTINGS
@given(st.lists(policy_docs, min_size=1, max_size=4))
def test_policy_shaped_structures_raise_only_policy_error(docs: list[Any]) -> None:
    _load_only_policy_error({"p/mesh.yaml": MESH, "p/dest.yaml": DESTS, "p/a.yaml": _dump(docs)})


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_policy_error(data: bytes) -> None:
    _load_only_policy_error({"p/a.yaml": data})  # type: ignore[dict-item]


@settings(max_examples=50, deadline=None)
@given(st.lists(policy_docs, min_size=1, max_size=3), st.randoms())
def test_loading_is_deterministic(docs: list[Any], rnd: Any) -> None:
    files = {"p/mesh.yaml": MESH, "p/dest.yaml": DESTS, "p/a.yaml": _dump(docs)}
    items = list(files.items())
    rnd.shuffle(items)
    first: Any
    second: Any
    try:
        first = load_policy_texts(files)
    except PolicyError as e:
        first = e.problems
    try:
        second = load_policy_texts(dict(items))
    except PolicyError as e:
        second = e.problems
    assert first == second

"""The libyaml fast path gives exactly what ruamel gives: the same documents (data, value types,
key and value positions) and the same problems, for any text -- or it hands the file to ruamel."""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_texts import DESTS, HEAD, MESH, R, agent
from ruamel.yaml import YAML

from meshgate.policy import yamlsource
from meshgate.policy.yamlsource import YamlDoc, parse_documents, parse_documents_ruamel

pytestmark = pytest.mark.skipif(yamlsource._LIBYAML is None, reason="libyaml is not installed")

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _view(result: tuple[list[YamlDoc], list[Any]]) -> Any:
    """Comparable form: repr keeps value types apart (1, 1.0, True, "1") and NaN equal to NaN."""
    docs, problems = result
    return [(d.file, repr(d.data), d.start, sorted(d.index.items(), key=repr)) for d in docs], [
        str(p) for p in problems
    ]


def _fast_taken(text: str) -> bool:
    try:
        yamlsource._parse_libyaml("p/a.yaml", text)
    except Exception:
        return False
    return True


def assert_same(text: str) -> None:
    fast = _view(parse_documents("p/a.yaml", text))
    slow = _view(parse_documents_ruamel("p/a.yaml", text))
    assert fast == slow, text


AGENT = agent(
    "researcher",
    R
    + "      methods: [GET, POST]\n"
    + '      paths: ["/v1/*", /v2/x]\n'
    + "      headers:\n        - {name: x-team, value: a}\n        - name: x-trace\n"
    + "      tools: [read_file]\n"
    + "      rateLimit: {requests: 60, per: 1m}\n",
)
GROUPS = (
    HEAD + "kind: AgentGroup\nmetadata: {name: alpha, labels: {team: a}}\nspec:\n"
    "  agents: [researcher, coder]\n  egress:\n    - destination: docs\n      methods: [GET]\n"
    "---\n" + HEAD + "kind: DefaultPolicy\nmetadata: {name: everyone}\nspec:\n  egress:\n"
    "    - destination: search-api\n      paths: [/health]\n"
)
FULL_DEST = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: docs, labels: {team: search, a: b}}
spec:
  host: Docs.Tools.Example
  port: 443
  address: 10.0.0.7:8443
  caFile: ./ca/internal.pem
  identity: jwt
  credentials:
    header: Authorization
    secret: docs-key
    format: "Bearer {secret}"
"""
POLICY_TEXTS = [MESH, DESTS, AGENT, GROUPS, FULL_DEST]

SCALARS = """\
a: [yes, no, on, off, y, n, Yes, NO, true, True, TRUE, false, FALSE, tRue]
b: [0x10, 0X10, 0o17, 0O17, 017, 08, 0b101, 1_000, +1, -1, 00, -0, 1__0, 0x_1f, 0b1_0]
c: [1.5, .5, -.5, +.5, 1e3, 1E3, 1.e3, 1e+3, 1.0e-3, .inf, -.Inf, +.INF, .nan, .NaN, 1_0.5]
d: [~, null, Null, NULL, nULL, '', "", 'null', "~", "true", '1']
e: [1:30, 190:20:30, 0.1.2, 1.2.3.4, 10.0.0.1:80, 2024-01, 2024-1-1]
f: [a b, 'it''s', "q\\"x", "\\x41\\u263A\\U0001F600\\/\\N\\_\\L\\P\\0\\a\\e\\ \\t", é, 😀 x]
g: {'<<': 2, "=": 3, "2024-01-01": x}
h: |
  literal
   kept

i: >
  folded
  text

   more
j: |-
  strip
k: >+
  keep

l: |2
    indented
m: plain
  continued
  lines
n: "double
  folded \\
  escaped"
o: 'single

  folded'
"""

EXAMPLES = [
    "",
    "\n",
    "# only a comment\n",
    "---\n---\n",
    "--- 5\n--- hello\n--- [1]\n...\n--- {a: 1}\n",
    "just a string",
    "- a\n-\n- - b\n  -\n- {}\n- []\n",
    "a:\nb: ~\nc: null\nd:\n  - \ne: {f: , g}\n",
    "? a\n: 1\n? b\n",
    "? [a, b]\n: 1\n",
    "? {a: 1}\n: 1\n",
    "[a, b]: 1\n",
    "1: a\n1.0: b\n",
    "a: 1\na: 2\n",
    "a: {b: 1, b: 2}\n",
    "true: 1\nnull: 2\n3: 4\n",
    "'true': 1\n\"3\": 4\n",
    "<<: {a: 1}\nb: 2\n",
    "a: &x 1\nb: *x\n",
    "a: &x {c: 1}\nb: *x\n",
    "a: !!str 1\nb: !!int '2'\nc: !custom x\nd: ! e\n",
    "%YAML 1.1\n---\na: yes\n",
    "%YAML 1.2\n---\na: yes\n",
    "%TAG !e! tag:example.com,2000:\n---\na: !e!x 1\n",
    "a:\n\tb: 1\n",
    "a: 1\r\nb: 2\r\n",
    "\ufeffa: 1\n",
    "a: 1\x85b: 2\n",
    "a: [1, 2\n",
    "a: {b: 1\n",
    "a: b: c\n",
    "a: 'unterminated\n",
    "- a\nb: 1\n",
    "a: 1\n b: 2\n",
    "kind: [",
    "a: 0b_\n",
    "a: _\n",
    "a: 0x_\n",
    "a: -_\n",
    "a: 2001-12-14t21:59:43.10-05:00\n",
    "a: 2024-01-01\n",
    "a: 2024-1-1 10:00:00\n",
    "a: [=]\n",
    "=: 1\n",
    "a: =\n",
    "a: <<\n",
    "x" * 1100 + ": 1\n",
    "a: " + "[" * 70 + "]" * 70 + "\n",
    "a: " + "[" * 400 + "]" * 400 + "\n",
    "a: " + "{b: " * 70 + "1" + "}" * 70 + "\n",
    "\n".join(f"- {i}" for i in range(100_050)) + "\n",
    "a: b\n...\n",
    "a: b\n... # end\n--- c\n",
    'a: "\\x"\n',
    'a: "\\/"\n',
    "{a: 1, b: [c, {d: e}], f: g}",
    "[a, {b: c}, [d]]",
    "a: [b, c,]\n",
    "a: {b: c,}\n",
    "a: [b: c, d]\n",
    "a: [? b : c]\n",
    "a: {? b}\n",
    "a: -\n",
    "a: - b\n",
    "-a: 1\n",
    "a:b: 1\n",
    "a: b#c\n",
    "a: b #c\n",
    "a: @b\n",
    "a: `b\n",
    "a: |\n x\n  y\n",
    "a: |\n  x\n y\n",
    "a: >\n\n  x\n",
    "a:   \n  b\n",
    "a: 'b\n  c'\n",
    'a: "b\n\n  c"\n',
    "a: 😀\nb: [é, ü]\nc: {ж: 1}\n",
    "😀: 1\n  é: 2\n",
    "a: [1, 2]]\n",
    "\x00",
    "a: \x07\n",
    "a: \x7f\n",
    "---\n- a\n--- !!map\nb: 1\n",
    "--- |\n  text\n",
    "--- >-\n  text\n",
    'a: "\\ud800"\n',
    "a: \ud800\n",
]


@pytest.mark.parametrize("text", [*POLICY_TEXTS, SCALARS, *EXAMPLES])
def test_examples_parse_the_same(text: str) -> None:
    assert_same(text)


@pytest.mark.parametrize("text", POLICY_TEXTS)
def test_ordinary_policies_take_the_fast_path(text: str) -> None:
    assert _fast_taken(text)


@pytest.mark.parametrize(
    "text",
    [
        "a: &x 1\n",
        "a: !!str 1\n",
        "<<: {a: 1}\n",
        "a: 1\na: 2\n",
        "1: a\n",
        "a: 2024-01-01\n",
        "%YAML 1.1\n---\na: 1\n",
        "a: [1, 2\n",
        "a:\n\tb: 1\n",
    ],
)
def test_what_ruamel_must_decide_goes_to_ruamel(text: str) -> None:
    assert not _fast_taken(text)


def test_without_libyaml_everything_goes_through_ruamel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yamlsource, "_LIBYAML", None)
    called: list[str] = []
    monkeypatch.setattr(yamlsource, "_parse_libyaml", lambda file, text: called.append(file) or [])
    docs, problems = parse_documents("p/a.yaml", MESH)
    assert called == [] and problems == [] and docs[0].data["kind"] == "Mesh"


# --------------------------------------------------------------------------- generated texts

PUNCTUATION = " \t\n-:[]{}&*!|>'\"%@`#,?abc01.~<=_\\"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["yes", "on", "0x10", "1_000", "0o7", "017", ".5", "null", "~", "<<", "="]),
)
structures = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


def _dump(docs: list[Any], flow: bool | None) -> str:
    out = io.StringIO()
    yaml = YAML()
    yaml.default_flow_style = flow
    yaml.dump_all(docs, out)
    return out.getvalue()


@SETTINGS
@given(st.text(max_size=300))
def test_arbitrary_text_parses_the_same(text: str) -> None:
    assert_same(text)


@SETTINGS
@given(st.text(alphabet=PUNCTUATION, max_size=120))
def test_punctuation_soup_parses_the_same(text: str) -> None:
    assert_same(text)


@SETTINGS
@given(st.lists(structures, min_size=1, max_size=3), st.sampled_from([None, True, False]))
def test_dumped_structures_parse_the_same(docs: list[Any], flow: bool | None) -> None:
    assert_same(_dump(docs, flow))


@SETTINGS
@given(
    st.sampled_from([*POLICY_TEXTS, SCALARS]),
    st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=1),
            st.integers(min_value=0, max_value=3),
            st.text(alphabet=PUNCTUATION + "\n\n   ", max_size=3),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_edited_policies_parse_the_same(base: str, edits: list[tuple[float, int, str]]) -> None:
    """Near-valid YAML: a real policy with a few characters deleted or inserted here and there."""
    text = base
    for where, delete, insert in edits:
        i = int(where * len(text))
        text = text[:i] + insert + text[i + delete :]
    assert_same(text)

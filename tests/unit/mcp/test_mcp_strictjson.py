"""Strict JSON: every body is either read exactly as the servers read it, or refused."""

from __future__ import annotations

import json
import math
from typing import Any

import pydantic_core
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshgate.mcp.strictjson import MAX_SAFE_INTEGER, Refusal, fold, read_json


def same(a: Any, b: Any) -> bool:
    """Equal values of equal JSON types (Python's == says 1 == 1.0 == True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


def refused(body: bytes, code: str) -> None:
    got = read_json(body)
    assert isinstance(got, Refusal), got
    assert got.code == code, got


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"a":1,"a":2}', "duplicate_key"),
        (b'{"x":{"a":1,"a":1}}', "duplicate_key"),
        (b'[{"Name":1,"name":2}]', "duplicate_key"),
        (b'{"arguments":{},"ARGUMENTS":{}}', "duplicate_key"),
        ('{"s":1,"\u017f":2}'.encode(), "duplicate_key"),  # long s folds to s (Go does too)
        ('{"k":1,"\u212a":2}'.encode(), "duplicate_key"),  # Kelvin sign folds to k
        (b'{"a":NaN}', "not_json"),
        (b'{"a":Infinity}', "not_json"),
        (b'{"a":-Infinity}', "not_json"),
        (b'{"a":1e400}', "number_out_of_range"),
        (b'{"a":-1e400}', "number_out_of_range"),
        (b'{"a":9007199254740992}', "number_out_of_range"),
        (b'{"a":-9007199254740992}', "number_out_of_range"),
        (b'{"a":' + b"9" * 5000 + b"}", "number_out_of_range"),
        (b'{"a":"\\ud800"}', "lone_surrogate"),
        (b'{"a":["x",{"b":"\\udc00y"}]}', "lone_surrogate"),
        (b'{"\\ud83d":1}', "lone_surrogate"),
        (b'{"a":"\xed\xa0\x80"}', "not_utf8"),  # a surrogate encoded in UTF-8
        (b'{"a":"\xff"}', "not_utf8"),
        (b'{"a":"\xc0\xaf"}', "not_utf8"),  # overlong
        (b'\xef\xbb\xbf{"a":1}', "not_utf8"),  # BOM
        (b"\xff\xfe{\x00}\x00", "not_utf8"),  # UTF-16
        (b'{"a":1} {"b":2}', "trailing_data"),
        (b'{"a":1}x', "trailing_data"),
        (b'{"a":1}\x00', "trailing_data"),
        (b'{"a":1}\xc2\xa0', "trailing_data"),  # NBSP is not JSON whitespace
        (b'\x0c{"a":1}', "not_json"),  # nor is form feed
        (b"", "not_json"),
        (b'{"a":1', "not_json"),
        (b"{'a':1}", "not_json"),
        (b'{"a":"\x01"}', "not_json"),  # raw control character
        (b'{"a":01}', "not_json"),
        (b"[" * 65 + b"]" * 65, "too_deep"),
        (b'{"a":"' + b"x" * (1 << 20) + b'"}', "too_large"),
    ],
)
def test_refusals(body: bytes, code: str) -> None:
    refused(body, code)


def test_depth_limit_is_exact_and_python_recursion_is_caught() -> None:
    assert read_json(b"[" * 64 + b"]" * 64) == json.loads(b"[" * 64 + b"]" * 64)
    refused(b"[" * 5000 + b"]" * 5000, "too_deep")


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1}',
        b' \t\r\n{"a":1} \t\r\n',
        b'{"a":[1,2.5,-0,-0.0,1e-400,true,false,null,"x"]}',
        b'{"pair":"\\ud83d\\ude00","escaped":"\\u00e9\\n\\/"}',
        '{"caf\u00e9":"\u20ac","Caf\u00e9s":1}'.encode(),
        b'{"a":9007199254740991,"b":-9007199254740991,"c":1.7976931348623157e308}',
        b'{"A":1,"b":2,"ab":3,"aB2":4}',
    ],
)
def test_accepted_bodies_read_as_python_and_pydantic_read_them(body: bytes) -> None:
    got = read_json(body)
    assert not isinstance(got, Refusal), got
    assert same(got, json.loads(body))
    assert same(got, pydantic_core.from_json(body))


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.sampled_from(["\ud800", "\udfff", "\ud83d\ude00", "\u017f", "K"])
)
_keys = st.sampled_from(["a", "A", "name", "Name", "arguments", "s", "\u017f", "k", "\u212a"])
_keys |= st.text(max_size=4)


def _json_text(value: Any) -> Any:
    """Serialise with duplicate keys possible: objects are lists of pairs."""
    if isinstance(value, list) and value and value[0] == "obj":
        items = [f"{_json_text(k)}:{_json_text(v)}" for k, v in value[1]]
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_json_text(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "Infinity", -math.inf: "-Infinity"}.get(value, "NaN")
    return json.dumps(value)


_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.builds(lambda pairs: ["obj", pairs], st.lists(st.tuples(_keys, inner), max_size=4))
    ),
    max_leaves=12,
)
_spaces = st.sampled_from(["", "", "", " ", "\r\n\t", "\x0c", "\x0b", "\xa0", "\u2028", "\ufeff"])


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out


def _folded_first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A server that looks keys up case-insensitively (Go's encoding/json into a struct)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        out.setdefault(fold(k), v)
    return out


def _folded_view(value: Any) -> Any:
    if isinstance(value, dict):
        return {fold(k): _folded_view(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_folded_view(v) for v in value]
    return value


def _check_agreement(body: bytes) -> None:
    """Accepted: Python's json, pydantic's from_json (the mcp SDK's two readers), a first-wins
    reader and a case-insensitive one all read the same value. The last two disagree with the
    first two exactly when keys repeat, so this is what proves the duplicate-key refusals."""
    got = read_json(body)
    if isinstance(got, Refusal):
        return
    assert same(got, json.loads(body)), body
    assert same(got, pydantic_core.from_json(body)), body
    assert same(got, json.loads(body, object_pairs_hook=_first_wins)), body
    insensitive = json.loads(body, object_pairs_hook=_folded_first_wins)
    assert same(_folded_view(got), insensitive), body


@settings(max_examples=300, deadline=None)
@given(
    _values,
    _spaces,
    _spaces,
    st.sampled_from(["", "", "", "", "x", " 1", "{}", "\x00"]),
    st.sampled_from([False, False, False, True]),
)
@example(["obj", [("a", 1), ("a", 2)]], "", "", "", False)
@example(["obj", [("s", 1), ("\u017f", 2)]], "", "", "", False)
@example(2**53, "", "", "", False)
def test_framing_variants_read_as_the_servers_read_them_or_are_refused(
    value: Any, before: str, after: str, trailer: str, bom: bool
) -> None:
    text = before + _json_text(value) + after + trailer
    body = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")
    _check_agreement(body)


@settings(max_examples=300, deadline=None)
@given(_values, st.sampled_from(["", " ", "\n", "\r\n\t "]))
@example(["obj", [("a", 1), ("a", 2)]], "")
@example(["obj", [("x", ["obj", [("Name", 1), ("name", 2)]])]], "")
@example(["obj", [("a", math.nan)]], "")
@example(["obj", [("a", "\ud800")]], "")
def test_every_value_reads_as_the_servers_read_it_or_is_refused(value: Any, space: str) -> None:
    body = (space + _json_text(value) + space).encode("utf-8", "surrogatepass")
    _check_agreement(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_arbitrary_bytes_are_read_as_python_reads_them_or_refused(body: bytes) -> None:
    _check_agreement(body)


def test_duplicate_and_lone_surrogate_bodies_are_what_python_would_read_differently() -> None:
    # the refusals are not cosmetic: Python keeps the last duplicate, others the first
    assert json.loads(b'{"a":1,"a":2}') == {"a": 2}
    assert json.loads(b'{"a":"\\ud800"}') == {"a": "\ud800"}
    assert json.loads(b'{"a":1e400}') == {"a": math.inf}
    assert json.loads(b'{"a":9007199254740993}')["a"] != float(9007199254740993)
    assert MAX_SAFE_INTEGER == 9007199254740991

"""RFC 8785 (JCS), checked against the RFC's own examples."""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.mcp.canonical import NotCanonical, canonical, canonical_text, digest, number
from meshgate.mcp.strictjson import Read, Refusal, read

# RFC 8785 appendix B: IEEE 754 bit patterns and their ECMAScript serialisation
RFC_NUMBERS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "text"), RFC_NUMBERS)
def test_rfc_number_examples(bits: str, text: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert number(value) == text
    assert canonical(value) == text.encode()


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_rfc_nan_and_infinity_have_no_form(bits: str) -> None:
    with pytest.raises(NotCanonical):
        canonical(struct.unpack(">d", bytes.fromhex(bits))[0])


def test_rfc_section_3_2_2_example() -> None:
    text = r"""{
      "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
      "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
      "literals": [null, true, false]
    }"""
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonical(json.loads(text)) == expected.encode("utf-8")


def test_rfc_section_3_2_3_sorting_is_by_utf16_code_units() -> None:
    text = r"""{
      "\u20ac": "Euro Sign",
      "\r": "Carriage Return",
      "\ufb33": "Hebrew Letter Dalet With Dagesh",
      "1": "One",
      "\ud83d\ude00": "Emoji: Grinning Face",
      "\u0080": "Control",
      "\u00f6": "Latin Small Letter O With Diaeresis"
    }"""
    keys = list(json.loads(canonical_text(json.loads(text))))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    # code-point order would put U+FB33 before the emoji: JCS must not
    assert sorted(keys) != keys


def test_strings_escape_only_what_jcs_escapes() -> None:
    value = '\x00\x08\t\n\x0c\r\x1f\x7f"\\/\u2028\u00e9\U0001f600'
    assert canonical(value) == (
        '"\\u0000\\b\\t\\n\\f\\r\\u001f\x7f\\"\\\\/\u2028\u00e9\U0001f600"'
    ).encode("utf-8")


def test_integers_and_floats_of_equal_value_are_one_form() -> None:
    assert canonical({"a": 1}) == canonical({"a": 1.0}) == b'{"a":1}'
    assert canonical(-0.0) == b"0"
    assert canonical(2**53) == b"9007199254740992"
    assert canonical(2**70) == canonical(float(2**70)) == b"1.1805916207174113e+21"
    with pytest.raises(NotCanonical):
        canonical(2**53 + 1)  # no double holds it: JCS has no form for it
    assert canonical(True) == b"true" and canonical(1) == b"1"  # bool is not a number here


@pytest.mark.parametrize("bad", [math.nan, "\ud800", {"\udc00": 1}, {1: 2}, object(), b"x"])
def test_non_json_values_are_refused(bad: Any) -> None:
    with pytest.raises(NotCanonical):
        canonical(bad)


def test_digest_ignores_order_spacing_and_escapes() -> None:
    a = json.loads('{"repo": "acme/web", "title": "caf\\u00e9", "n": 1.0}')
    b = json.loads('{"n":1,"title":"café","repo":"acme/web"}')
    assert digest(a) == digest(b)
    assert digest(a) == "sha256:" + hashlib.sha256(canonical(b)).hexdigest()
    assert digest({"repo": "acme/web"}) != digest({"repo": "acme/api"})


_finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=500, deadline=None)
@given(_finite)
def test_numbers_round_trip_and_are_shortest(x: float) -> None:
    text = number(x)
    assert float(text) == x  # reads back as the same double
    assert ("e" in text) == (x != 0 and not 1e-6 <= abs(x) < 1e21)  # ECMAScript's layout
    assert len(text.lstrip("-").split("e")[0].replace(".", "").strip("0")) <= len(repr(x))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _finite | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(_json, st.randoms(use_true_random=False))
def test_canonical_form_is_a_fixed_point_and_ignores_key_order(
    value: Any, rnd: random.Random
) -> None:
    once = canonical(value)
    assert canonical(json.loads(once, parse_int=float)) == once  # JCS numbers are doubles
    shuffled = _shuffle(value, rnd)
    assert canonical(shuffled) == once


def _shuffle(value: Any, rnd: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _shuffle(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_shuffle(v, rnd) for v in value]
    return value


_bmp_text = st.text(
    alphabet=st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), max_size=5
)
_simple_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _bmp_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_bmp_text, inner, max_size=4),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(_simple_json)
def test_fast_path_writes_the_same_bytes_when_its_conditions_hold(value: Any) -> None:
    assert canonical(value, simple=True) == canonical(value)


@settings(max_examples=300, deadline=None)
@given(_json | _simple_json, st.sampled_from([None, 0, 1]))
def test_the_reader_says_simple_only_when_the_fast_path_is_exact(value: Any, indent: Any) -> None:
    body = json.dumps(value, indent=indent, ensure_ascii=indent == 1).encode()
    got = read(body)
    assert not isinstance(got, Refusal) or got.code == "number_out_of_range"
    if isinstance(got, Read) and got.simple:
        assert canonical(got.value, simple=True) == canonical(got.value)


def test_reader_flags() -> None:
    for body, simple in [
        (b'{"a":[1,"x.y",{"b":null}]}', True),
        (b'{"a":"v1.2","b":"1e5"}', True),  # numbers in strings are not floats
        (b'{"jsonrpc":"2.0","id":1,"x":[1,2,3.0]}', False),
        (b'{"a":1.5}', False),
        (b'{"a":1e3}', False),
        ('{"\U0001f600":1}'.encode(), False),
        (b'{"\\ud83d\\ude00":1}', False),
        (b'{"\\u00e9":1,"z":2}', True),
    ]:
        got = read(body)
        assert isinstance(got, Read) and got.simple is simple, body

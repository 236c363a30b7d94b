"""Strict JSON: read a body exactly as every conforming server would, or refuse it.

A gateway rule is only as good as the agreement between what the gateway reads and what the
server reads. JSON parsers disagree on duplicate keys (first or last wins; Go matches keys
case-insensitively), on lone surrogates, on huge integers (exact in Python, rounded in
JavaScript), NaN/Infinity literals, a byte-order mark and bytes that are not UTF-8. Each of
those is refused here, so what is accepted reads the same in Python's `json`, pydantic's
`from_json` (the official `mcp` SDK uses both) and JavaScript's `JSON.parse`.

The work is `json.loads` (C) plus hooks; the full walk of the value runs only when a cheap scan
of the text says nesting or a surrogate escape may be present.
"""

from __future__ import annotations

import json
import math
import re
import threading
import unicodedata
from dataclasses import dataclass
from typing import Any

MAX_BODY_BYTES = 1 << 20  # what the gateway buffers for an MCP host
MAX_DEPTH = 64
MAX_SAFE_INTEGER = 2**53 - 1  # beyond it JavaScript (and JCS) round: readers would disagree
_MAX_INT_TEXT = 17  # "-9007199254740991" is 17 characters; anything longer is too large

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_WHITESPACE = " \t\n\r"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a body is refused: a short stable `code` (audit, metrics) and a sentence for people."""

    code: str
    message: str


class Refused(Exception):
    """Raised inside json hooks; carries the refusal out of the C scanner."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.refusal = Refusal(code, message)


def fold(key: str) -> str:
    """The form under which two keys count as the same: NFKC then Unicode case folding, a
    superset of what case-insensitive decoders (Go's encoding/json) treat as equal."""
    if key.isascii():
        return key.lower()
    return unicodedata.normalize("NFKC", key).casefold()


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    n = len(pairs)
    if len(obj) == n and (n < 2 or _distinct_ascii_folds(obj)):
        return obj
    seen: dict[str, str] = {}
    for k, _ in pairs:
        f = fold(k)
        if k in obj and seen.get(f) == k:
            raise Refused("duplicate_key", f"key {json.dumps(k)} appears twice in an object")
        if f in seen:
            raise Refused(
                "duplicate_key",
                f"keys {json.dumps(seen[f])} and {json.dumps(k)} differ only in case "
                f"(some servers read them as one key)",
            )
        seen[f] = k
    return obj


def _distinct_ascii_folds(obj: dict[str, Any]) -> bool:
    """The common case, in C: ASCII keys, distinct in lower case."""
    return "".join(obj).isascii() and len(set(map(str.lower, obj))) == len(obj)


def _constant(name: str) -> Any:
    raise Refused("not_json", f"{name} is not JSON (servers disagree on how to read it)")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Refused("number_out_of_range", f"number {text[:40]} is out of range")
    _seen.float = True
    return value


def _int(text: str) -> int:
    if len(text) > _MAX_INT_TEXT or abs(value := int(text)) > MAX_SAFE_INTEGER:
        raise Refused(
            "number_out_of_range",
            f"integer {text[:40]} is beyond ±(2^53-1) (JSON readers round it differently)",
        )
    return value


# Two decoders: the integer hook costs a Python call per integer, and only an integer of 16 or
# more digits (2^53 has 16) can be out of range, which a byte translation finds in C. The float
# hook runs for floats only; it also notes (per thread) that the value holds one.
_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant, parse_float=_float)
_NUMBER_DECODER = json.JSONDecoder(
    object_pairs_hook=_object, parse_constant=_constant, parse_float=_float, parse_int=_int
)
_DIGITS = bytes.maketrans(b"0123456789", b"0000000000")
_LONG_DIGIT_RUN = b"0" * 16
_seen = threading.local()


@dataclass(frozen=True, slots=True)
class Read:
    """A value and what the reader learnt on the way. `simple`: no float and no key outside the
    Basic Multilingual Plane (and, as always here, integers within ±(2^53-1)), so
    `json.dumps(sort_keys=True)` is already its RFC 8785 form (canonical.py's C fast path)."""

    value: Any
    simple: bool


def read_json(
    body: bytes, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_DEPTH
) -> Any | Refusal:
    """The one JSON value in `body`, or why it is refused (never an exception)."""
    got = read(body, max_bytes, max_depth)
    return got if isinstance(got, Refusal) else got.value


def read(
    body: bytes, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_DEPTH
) -> Read | Refusal:
    """`read_json`, with what the reader learnt about the value."""
    if len(body) > max_bytes:
        return Refusal("too_large", f"body is larger than {max_bytes} bytes")
    if body.startswith(b"\xef\xbb\xbf"):
        return Refusal("not_utf8", "body starts with a byte-order mark")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return Refusal("not_utf8", f"body is not valid UTF-8 (at byte {e.start})")
    decoder = _NUMBER_DECODER if _LONG_DIGIT_RUN in body.translate(_DIGITS) else _DECODER
    _seen.float = False
    try:
        value, end = decoder.raw_decode(text, _skip(text, 0))
    except Refused as e:
        return e.refusal
    except RecursionError:
        return Refusal("too_deep", f"nested deeper than {max_depth} levels")
    except json.JSONDecodeError as e:
        return Refusal("not_json", f"not JSON: {e.msg} at line {e.lineno} column {e.colno}")
    except ValueError as e:  # int() limits and the like
        return Refusal("not_json", f"not JSON: {e}")
    if _skip(text, end) != len(text):
        return Refusal("trailing_data", "data after the JSON value")
    if text.count("{") + text.count("[") > max_depth and _too_deep(value, max_depth):
        return Refusal("too_deep", f"nested deeper than {max_depth} levels")
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    if surrogates and _has_lone_surrogate(value):
        return _lone_surrogate()
    # an escaped pair (\ud83d\ude00) decodes outside the BMP even in ASCII text
    bmp = not surrogates and (text.isascii() or max(text) <= "\uffff")
    return Read(value, bmp and not _seen.float)


def _skip(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WHITESPACE:
        i += 1
    return i


def _too_deep(value: Any, max_depth: int) -> bool:
    """Level by level, so a node costs a type check and the list work is in C."""
    level = [value]
    for _ in range(max_depth):
        below: list[Any] = []
        for node in level:
            kind = type(node)
            if kind is dict:
                below.extend(node.values())
            elif kind is list:
                below.extend(node)
        if not below:
            return False
        level = below
    return any(type(node) is dict or type(node) is list for node in level)


def _has_lone_surrogate(value: Any) -> bool:
    """A pair was already joined by json; a lone one stays, in a key or a string."""
    stack = [value]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is dict:
            if any(_SURROGATE.search(k) for k in node):
                return True
            stack.extend(node.values())
        elif kind is list:
            stack.extend(node)
        elif kind is str and _SURROGATE.search(node):
            return True
    return False


def _lone_surrogate() -> Refusal:
    return Refusal("lone_surrogate", "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)")

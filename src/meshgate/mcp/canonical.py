"""RFC 8785 (JCS) canonical JSON: one byte string per JSON value, for digests and comparisons.

Audit records keep a digest of a call's arguments instead of the arguments (they can hold
secrets); the digest must not depend on key order, spacing or escapes the client chose, so two
equal calls hash alike wherever they are computed. Policy `const`/`enum` values are kept in the
same form, so "is this argument one of these values" is a byte comparison.

Numbers follow ECMAScript's Number.prototype.toString (JCS section 3.2.2.3); Python's float
repr already gives the shortest digits that round-trip, only the layout differs. Keys sort by
UTF-16 code units (3.2.3), not code points.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

MAX_EXACT = 2**53  # integers beyond this are not exact IEEE doubles; JCS numbers are doubles


class NotCanonical(ValueError):
    """A value with no JCS form: NaN, infinity, an inexact integer, a lone surrogate..."""


def canonical(value: Any, simple: bool = False) -> bytes:
    """The JCS bytes (UTF-8) of a JSON value as `json.loads` returns it.

    `simple`: the caller knows the value holds no float, no integer beyond ±2^53 and no key
    outside the Basic Multilingual Plane (the strict reader tells, `Read.simple`). Then
    `json.dumps` with sorted keys already writes JCS (code-point order is UTF-16 order in the
    BMP; integers and escapes are the same), in C instead of Python."""
    if simple:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        return text.encode("utf-8")
    out: list[str] = []
    _write(value, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError:
        raise NotCanonical("a string holds a lone surrogate") from None


def canonical_text(value: Any) -> str:
    return canonical(value).decode("utf-8")


def digest(value: Any, simple: bool = False) -> str:
    """`sha256:<hex>` of the canonical form."""
    return "sha256:" + hashlib.sha256(canonical(value, simple)).hexdigest()


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        if abs(value) <= MAX_EXACT:
            out.append(str(value))
        elif abs(value) < 2**1024 and int(float(value)) == value:
            out.append(number(float(value)))
        else:
            raise NotCanonical(f"integer {value} is not exact as an IEEE double")
    elif isinstance(value, float):
        out.append(number(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value, key=_utf16)):
            if not isinstance(key, str):
                raise NotCanonical(f"object key {key!r} is not a string")
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise NotCanonical(f"{type(value).__name__} is not a JSON value")


def _utf16(key: Any) -> bytes:
    return str(key).encode("utf-16-be", "surrogatepass")


def _string(s: str) -> str:
    # json.dumps without ensure_ascii escapes exactly what JCS escapes: " \ and C0 controls
    # (\b \t \n \f \r by name, the rest as \u00xx in lower case); nothing else.
    return json.dumps(s, ensure_ascii=False)


def number(x: float) -> str:
    """ECMAScript's shortest round-trip form of a double."""
    if not math.isfinite(x):
        raise NotCanonical(f"{x} has no JSON form")
    if x == 0:
        return "0"  # also -0
    sign = "-" if x < 0 else ""
    mantissa, _, exp = repr(abs(x)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    n = len(whole) + (int(exp) if exp else 0) - (len(whole + frac) - len(digits))
    digits = digits.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        esign = "+" if e >= 0 else "-"
        lead = digits[0] + ("." + digits[1:] if k > 1 else "")
        body = f"{lead}e{esign}{abs(e)}"
    return sign + body

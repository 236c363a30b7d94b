"""Checks for the small string languages inside a policy: names, hosts, paths, periods...

Each check returns the (possibly normalised) value or raises `PydanticCustomError`, whose message
becomes `<field> <value>: <message>`. Kept apart from the models so they read as a spec.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import math
import re
from collections.abc import Callable
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from re import _constants as _sre  # type: ignore[attr-defined]
from re import _parser as _sre_parse  # type: ignore[attr-defined]
from typing import Any

from pydantic_core import PydanticCustomError

from meshgate import durations

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
PERIOD_UNITS = "smhd"
MAX_REQUESTS = 1_000_000_000
MAX_PERIOD_SECONDS = 366 * 86400

_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_NAME_RE = re.compile(rf"^{_LABEL}$")
_DNS_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_SECRET_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_TOOL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
SECRET_PLACEHOLDER = "{secret}"
_PERIOD_PROBLEMS = {
    durations.Problem.SYNTAX: "must be <count><unit>, like 1m, 10s, 1h or 1d",
    durations.Problem.UNIT: "unit must be one of s, m, h, d",
    durations.Problem.NOT_POSITIVE: "count must be at least 1",
    durations.Problem.NOT_WHOLE: "must be a whole number of seconds",
    durations.Problem.TOO_LONG: "must be at most 366 days",
}


def fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("meshgate", message)


def fail_hidden(message: str) -> PydanticCustomError:
    """An error whose message must not echo the value (it may hold a secret)."""
    return PydanticCustomError("meshgate_hidden", message)


def name(v: str) -> str:
    if not _NAME_RE.match(v):
        raise fail(
            "must be a DNS label: lower-case letters, digits and '-', at most 63 characters, "
            "starting and ending with a letter or digit"
        )
    return v


def dns_name(v: str) -> str:
    if len(v) > 253 or not _DNS_RE.match(v):
        raise fail("must be a lower-case DNS name like agents.example")
    return v


def host(v: str) -> str:
    h = v.lower()
    if "://" in h or "/" in h:
        raise fail("must be a bare host name, not a URL")
    if ":" in h:
        raise fail("must not include a port; use the port field")
    body = h[2:] if h.startswith("*.") else h
    if "*" in body:
        raise fail('a wildcard is only allowed as the whole first label, like "*.example.com"')
    if len(body) > 253 or not _DNS_RE.match(body):
        raise fail("must be a DNS name (letters, digits, '-' and '.') or an IPv4 address")
    return h


def port(v: int) -> int:
    if not 1 <= v <= 65535:
        raise fail("must be between 1 and 65535")
    return v


def address(v: str) -> str:
    parse_address(v)
    return v


def parse_address(v: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` to (host, port); raises PydanticCustomError when malformed."""
    usage = "must be host:port, like 10.0.0.7:8443"
    if v.startswith("["):
        end = v.find("]")
        if end < 0 or v[end + 1 : end + 2] != ":":
            raise fail(usage)
        h, p = v[1:end], v[end + 2 :]
        try:
            ipaddress.IPv6Address(h)
        except ValueError:
            raise fail("must be [IPv6]:port when it starts with '['") from None
    else:
        h, sep, p = v.rpartition(":")
        if not sep or not h:
            raise fail(usage)
        h = h.lower()
        if ":" in h:
            raise fail("IPv6 addresses must be written [addr]:port")
        if len(h) > 253 or not _DNS_RE.match(h):
            raise fail("host part must be an IP address or DNS name")
    if not p.isascii() or not p.isdigit() or len(p) > 5 or not 1 <= int(p) <= 65535:
        raise fail("port part must be between 1 and 65535")
    return h, int(p)


def header_name(v: str) -> str:
    if not _TOKEN_RE.match(v):
        raise fail("is not a valid HTTP header name")
    return v


def secret_name(v: str) -> str:
    if not _SECRET_RE.match(v):
        raise fail(
            "must be letters, digits, '.', '_' or '-' (no '/'), "
            "starting and ending with a letter or digit"
        )
    return v


_CONSUL_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?$")


def consul_address(v: str) -> str:
    """`http://host:port` or `https://host:port` (Consul's HTTP API), nothing after the port."""
    scheme, sep, rest = v.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise fail("must start with http:// or https://, like http://127.0.0.1:8500")
    rest = rest.removesuffix("/")
    if not rest or any(c in rest for c in "/?#@"):
        raise fail("must be http(s)://host:port with no path, query or user")
    parse_address(rest)
    return f"{scheme}://{rest}"


def split_consul_address(v: str) -> tuple[str, str, int]:
    """A checked `consul_address` as (scheme, host, port)."""
    scheme, _, rest = v.partition("://")
    host, port = parse_address(rest)
    return scheme, host, port


def consul_name(v: str) -> str:
    """A Consul service name or datacenter: letters, digits, '-', '_', '.'."""
    if not _CONSUL_NAME_RE.match(v):
        raise fail(
            "must be letters, digits, '-', '_' or '.', starting and ending with a letter or "
            "digit, at most 128 characters"
        )
    return v


def consul_tag(v: str) -> str:
    if not v or any(c.isspace() or c in "/?#&" for c in v):
        raise fail("must be a non-empty tag without spaces, '/', '?', '#' or '&'")
    return v


def secret_format(v: str) -> str:
    if v.count(SECRET_PLACEHOLDER) != 1:
        raise fail_hidden("must contain {secret} exactly once")
    if any(c in v for c in "\r\n\0"):
        raise fail_hidden("must not contain line breaks or NUL")
    return v


def method(v: str) -> str:
    if v in HTTP_METHODS:
        return v
    if v.upper() in HTTP_METHODS:
        raise fail(f'HTTP methods must be upper-case (did you mean "{v.upper()}"?)')
    raise fail(f"is not an HTTP method (expected one of {', '.join(HTTP_METHODS)})")


def path(v: str) -> str:
    if not v.startswith("/"):
        raise fail('must start with "/"')
    if "*" in v[:-1]:
        raise fail('"*" is only allowed at the end, as a prefix match like "/v1/*"')
    if any(c.isspace() for c in v) or "?" in v or "#" in v:
        raise fail("must not contain spaces, '?' or '#'")
    return v


def tool(v: str) -> str:
    if not _TOOL_RE.match(v):
        raise fail("must be 1-128 letters, digits, '_', '.' or '-'")
    return v


def requests(v: int) -> int:
    if v < 1:
        raise fail("must be at least 1")
    if v > MAX_REQUESTS:
        raise fail(f"must be at most {MAX_REQUESTS}")
    return v


def period(v: str) -> str:
    period_seconds(v)
    return v


def period_seconds(v: str) -> int:
    try:
        return durations.parse_seconds(
            v,
            "per",
            units=PERIOD_UNITS,
            bare=False,
            fractions=False,
            positive=True,
            maximum=dt.timedelta(seconds=MAX_PERIOD_SECONDS),
        )
    except durations.DurationError as exc:
        raise fail(_PERIOD_PROBLEMS[exc.problem]) from None


def non_empty(v: str) -> str:
    if not v:
        raise fail("must not be empty")
    return v


def non_empty_list(what: str) -> Callable[[list[Any]], list[Any]]:
    """A list validator: an explicit empty list is ambiguous ("nothing" or "anything")."""

    def check(v: list[Any]) -> list[Any]:
        if not v:
            raise fail(f"must not be empty (omit it to allow any {what})")
        return v

    return check


MAX_WAIT_SECONDS = 600  # a request held longer than this is better refused and retried
MAX_CONCURRENCY = 1_000_000
MAX_TOKENS = 10_000_000
MAX_USD = Decimal("1000000000")
_MODEL_RE = re.compile(r"^[A-Za-z0-9_.:/*?@-]{1,200}$")


def max_wait(v: str) -> str:
    max_wait_ms(v)
    return v


def max_wait_ms(v: str) -> int:
    """`maxWait`: `0s`..`10m`, fractions allowed (`0.5s`), in whole milliseconds."""
    try:
        waited = durations.parse_duration(
            v, "maxWait", units="smh", bare=False, maximum=dt.timedelta(seconds=MAX_WAIT_SECONDS)
        )
    except durations.DurationError as exc:
        if exc.problem == durations.Problem.TOO_LONG:
            raise fail(f"must be at most {MAX_WAIT_SECONDS // 60}m") from None
        raise fail("must be <count><unit>, like 0s, 500ms as 0.5s, 10s or 1m") from None
    return round(waited.total_seconds() * 1000)


def concurrency(v: int) -> int:
    if not 1 <= v <= MAX_CONCURRENCY:
        raise fail(f"must be between 1 and {MAX_CONCURRENCY}")
    return v


def token_count(v: int) -> int:
    if not 1 <= v <= MAX_TOKENS:
        raise fail(f"must be between 1 and {MAX_TOKENS}")
    return v


def model_glob(v: str) -> str:
    if not _MODEL_RE.match(v):
        raise fail("must be 1-200 letters, digits or . _ - : / @, with * and ? as wildcards")
    return v


def usd(v: str | int | float) -> str:
    """An amount of US dollars, kept as the exact decimal text (no float rounding of money)."""
    if isinstance(v, bool):
        raise fail("must be an amount like 25 or 0.15")
    text = repr(v) if isinstance(v, float) else str(v)
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise fail("must be an amount like 25 or 0.15") from None
    if not amount.is_finite() or amount < 0 or amount > MAX_USD:
        raise fail(f"must be between 0 and {MAX_USD}")
    return str(amount)


def micro_usd(v: str) -> int:
    """Whole micro-dollars, rounded up: a budget is never larger than written."""
    return int((Decimal(v) * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


# -- MCP tool-argument rules -----------------------------------------------------------------

MAX_ARGUMENT_NAME = 256
MAX_PATTERN = 512
PATTERN_INPUT_LIMIT = 1024  # longest string a pattern is run on; a longer value fails it
MAX_VARYING_REPEATS = 2  # quantifiers with an upper bound above 1 (*, +, {2,}, {1,9}, ...)
MAX_OPTIONAL_REPEATS = 3  # ? and {0,1}
_SINGLE = frozenset({_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN})
_ANCHORS = frozenset(
    {
        _sre.AT_BEGINNING,
        _sre.AT_BEGINNING_STRING,
        _sre.AT_END,
        _sre.AT_END_STRING,
        _sre.AT_BOUNDARY,
        _sre.AT_NON_BOUNDARY,
    }
)


def argument_name(v: str) -> str:
    if not v or len(v) > MAX_ARGUMENT_NAME or not v.isprintable():
        raise fail(f"must be 1-{MAX_ARGUMENT_NAME} printable characters")
    return v


def max_length(v: int) -> int:
    if v < 0:
        raise fail("must be 0 or more")
    return v


def json_number(v: Any) -> int | float:
    """`minimum`/`maximum`: a finite number an IEEE double holds exactly when it is whole."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise fail("must be a number")
    if isinstance(v, float) and not math.isfinite(v):
        raise fail("must be a finite number")
    if isinstance(v, int) and abs(v) > 2**53:
        raise fail("must be between -2^53 and 2^53 (JSON numbers are doubles)")
    return v


def argument_pattern(v: str) -> str:
    """A pattern in the documented dialect (compiled here, so a bad one is a policy error)."""
    compile_argument_pattern(v)
    return v


@functools.lru_cache(maxsize=4096)
def compile_argument_pattern(v: str) -> re.Pattern[str]:
    """Python `re` syntax, ASCII classes, matched against the whole value (`fullmatch`).

    Python's `re` backtracks, and there is no timeout to stop it; instead the dialect keeps
    the worst case small and bounded: no backreferences, lookarounds, inline flags or
    possessive/atomic groups; a quantifier that may repeat more than once applies to a single
    character or class only (so no nested or alternating repeats); at most
    MAX_VARYING_REPEATS such quantifiers and MAX_OPTIONAL_REPEATS optional ones per pattern,
    and values longer than PATTERN_INPUT_LIMIT fail. The worst case left is quadratic in a
    1024-character value (a few milliseconds)."""
    if len(v) > MAX_PATTERN:
        raise fail(f"must be at most {MAX_PATTERN} characters")
    try:
        parsed = _sre_parse.parse(v, re.ASCII)
        compiled = re.compile(v, re.ASCII)
    except re.error as e:
        raise fail(f"is not a valid regular expression: {e}") from None
    if parsed.state.flags & ~(re.ASCII | re.UNICODE):
        raise fail("must not set flags like (?i) or (?s): write the classes out")
    counts = [0, 0]
    _check_pattern(parsed, counts)
    if counts[0] > MAX_VARYING_REPEATS:
        raise fail(
            f"has {counts[0]} repeating quantifiers (*, +, {{m,n}}); at most "
            f"{MAX_VARYING_REPEATS} are allowed, to keep matching fast"
        )
    if counts[1] > MAX_OPTIONAL_REPEATS:
        raise fail(f"has more than {MAX_OPTIONAL_REPEATS} optional parts (?)")
    return compiled


def _check_pattern(items: Any, counts: list[int]) -> None:
    for op, arg in items:
        if op in _SINGLE:
            continue
        if op == _sre.AT and arg in _ANCHORS:
            continue
        if op == _sre.BRANCH:
            for alternative in arg[1]:
                _check_pattern(alternative, counts)
        elif op == _sre.SUBPATTERN:
            _group, add_flags, del_flags, body = arg
            if add_flags or del_flags:
                raise fail("must not set flags like (?i:...): write the classes out")
            _check_pattern(body, counts)
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
            low, high, body = arg
            single = len(body) == 1 and body[0][0] in _SINGLE
            if low != high and high > 1:
                if not single:
                    raise fail(
                        "a quantifier that repeats (*, +, {m,n}) may only follow a single "
                        "character or class, like [a-z]+ (nested or grouped repeats can "
                        "take exponential time)"
                    )
                counts[0] += 1
            elif low != high:
                counts[1] += 1
                _check_pattern(body, counts)
            elif high > 1 and not single:
                before = list(counts)
                _check_pattern(body, counts)
                if counts != before:
                    raise fail("a fixed repeat {n} of a group must not contain quantifiers")
            else:
                _check_pattern(body, counts)
        else:
            raise fail(
                "uses a construct outside the supported subset (backreferences, lookarounds, "
                "conditionals and possessive or atomic groups are not allowed)"
            )

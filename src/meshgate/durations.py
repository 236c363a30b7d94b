"""Lengths of time as people type them: `30s`, `15m`, `1h`, `7d`, `2w`, `1.5h` or bare seconds.

The one parser behind every option and field that takes a duration (`token create --ttl`,
`--vault-intermediate-ttl`, `audit --since/--retain`, policy `rateLimit.per`), so they cannot
drift apart. Each caller narrows the grammar (units, fractions, bounds); every error names the
option or field and the text, on one line. Pure: no clock, no I/O.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from decimal import Decimal
from enum import StrEnum

from meshgate.errors import ConfigError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
ALL_UNITS = "smhdw"
_EXAMPLES = {"s": "30s", "m": "15m", "h": "1h", "d": "7d", "w": "2w"}
# counts are read as Decimal: exact for "1.5h", and no float overflow for a 400-digit count
_SYNTAX = re.compile(r"\s*(?P<count>\d+(?P<fraction>\.\d+)?)\s*(?P<unit>[A-Za-z]*)\s*")
_MAX_SECONDS = Decimal(dt.timedelta.max.total_seconds())


class Problem(StrEnum):
    """Why a text is not an acceptable duration; lets a caller word it its own way."""

    SYNTAX = "syntax"  # not <count>[<unit>], or a fraction where whole counts are required
    UNIT = "unit"  # an unknown unit, or none where one is required
    NOT_POSITIVE = "not_positive"
    NOT_WHOLE = "not_whole"  # not a whole number of seconds
    TOO_LONG = "too_long"


class DurationError(ConfigError):
    """`<what>: '<text>' <detail>`; `problem` says which rule failed."""

    def __init__(self, what: str, text: str, problem: Problem, detail: str) -> None:
        super().__init__(f"{what}: {text!r} {detail}")
        self.what = what
        self.text = text
        self.problem = problem


def _one_of(words: Sequence[str]) -> str:
    return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else "".join(words)


def parse_duration(
    text: str,
    what: str,
    *,
    units: str = ALL_UNITS,
    bare: bool = True,
    fractions: bool = True,
    positive: bool = False,
    maximum: dt.timedelta | None = None,
) -> dt.timedelta:
    """`text` as a duration; `what` (the option or field) names it in errors.

    `bare`: a count without unit is seconds; `fractions`: `1.5h` is allowed; `positive`: zero
    is refused; `maximum`: inclusive upper bound."""
    match = _SYNTAX.fullmatch(text)
    if not match or (match.group("fraction") and not fractions):
        examples = _one_of([_EXAMPLES[u] for u in units])
        raise DurationError(what, text, Problem.SYNTAX, f"is not a duration like {examples}")
    unit = match.group("unit")
    if unit and unit not in tuple(units):
        raise DurationError(
            what, text, Problem.UNIT, f"has an unknown unit {unit!r}: use {_one_of(units)}"
        )
    if not unit and not bare:
        raise DurationError(what, text, Problem.UNIT, f"needs a unit: {_one_of(units)}")
    seconds = Decimal(match.group("count")) * UNITS.get(unit, 1)
    if positive and seconds <= 0:
        raise DurationError(what, text, Problem.NOT_POSITIVE, "must be longer than zero")
    if seconds > _MAX_SECONDS:
        raise DurationError(what, text, Problem.TOO_LONG, "is too long a duration")
    duration = dt.timedelta(seconds=float(seconds))
    if maximum is not None and duration > maximum:
        raise DurationError(what, text, Problem.TOO_LONG, f"must be at most {maximum}")
    return duration


def parse_seconds(
    text: str,
    what: str,
    *,
    units: str = ALL_UNITS,
    bare: bool = True,
    fractions: bool = True,
    positive: bool = False,
    maximum: dt.timedelta | None = None,
) -> int:
    """Like `parse_duration`, as a whole number of seconds (`1.5h` yes, `1.5s` no)."""
    duration = parse_duration(
        text,
        what,
        units=units,
        bare=bare,
        fractions=fractions,
        positive=positive,
        maximum=maximum,
    )
    if duration.microseconds:
        raise DurationError(what, text, Problem.NOT_WHOLE, "is not a whole number of seconds")
    return duration // dt.timedelta(seconds=1)


def is_duration(text: str, *, units: str = ALL_UNITS, bare: bool = True) -> bool:
    """Whether `text` is written as a duration (bounds aside): tells `1h` from a timestamp."""
    match = _SYNTAX.fullmatch(text)
    if not match:
        return False
    unit = match.group("unit")
    return unit in tuple(units) if unit else bare

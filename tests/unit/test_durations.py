"""meshgate.durations: the one duration grammar, its narrowings, and one-line errors."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshgate.durations import (
    UNITS,
    DurationError,
    Problem,
    is_duration,
    parse_duration,
    parse_seconds,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("2h", 7200),
        ("7d", 7 * 86400),
        ("2w", 14 * 86400),
        ("1.5h", 5400),
        (" 24h ", 86400),
        ("90", 90),  # bare seconds
        ("0s", 0),
    ],
)
def test_accepted(text: str, seconds: float) -> None:
    assert parse_duration(text, "--x") == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("text", "kwargs", "problem", "message"),
    [
        ("soon", {}, Problem.SYNTAX, "--x: 'soon' is not a duration like 30s, 15m, 1h, 7d or 2w"),
        ("", {}, Problem.SYNTAX, "--x: '' is not a duration"),
        ("-5m", {}, Problem.SYNTAX, "--x: '-5m' is not a duration"),
        ("1y", {}, Problem.UNIT, "--x: '1y' has an unknown unit 'y': use s, m, h, d or w"),
        ("1hm", {}, Problem.UNIT, "--x: '1hm' has an unknown unit 'hm'"),
        ("1H", {}, Problem.UNIT, "--x: '1H' has an unknown unit 'H'"),
        (
            "2w",
            {"units": "smhd"},
            Problem.UNIT,
            "--x: '2w' has an unknown unit 'w': use s, m, h or d",
        ),
        ("10", {"bare": False}, Problem.UNIT, "--x: '10' needs a unit: s, m, h, d or w"),
        ("1.5h", {"fractions": False}, Problem.SYNTAX, "--x: '1.5h' is not a duration"),
        ("0m", {"positive": True}, Problem.NOT_POSITIVE, "--x: '0m' must be longer than zero"),
        ("9" * 40 + "d", {}, Problem.TOO_LONG, "is too long a duration"),
        ("2d", {"maximum": dt.timedelta(days=1)}, Problem.TOO_LONG, "must be at most 1 day"),
    ],
)
def test_refused_with_what_and_text(
    text: str, kwargs: dict[str, object], problem: Problem, message: str
) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text, "--x", **kwargs)  # type: ignore[arg-type]
    assert info.value.problem is problem
    assert message in str(info.value) and str(info.value).startswith("--x: ")
    assert "\n" not in str(info.value)


def test_whole_seconds() -> None:
    assert parse_seconds("1.5h", "--ttl") == 5400
    assert parse_seconds("0.5m", "--ttl") == 30
    with pytest.raises(DurationError, match=r"^--ttl: '1\.5s' is not a whole number of seconds$"):
        parse_seconds("1.5s", "--ttl")


def test_is_duration_tells_durations_from_timestamps() -> None:
    assert is_duration("1h") and is_duration(" 2w ") and is_duration("90")
    assert not is_duration("90", bare=False)  # 20261124 is an ISO basic date
    assert not is_duration("2026-11-24") and not is_duration("1y") and not is_duration("")


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(UNITS)))
def test_count_times_unit(count: int, unit: str) -> None:
    assert parse_seconds(f"{count}{unit}", "f") == count * UNITS[unit]
    assert parse_duration(f" {count} {unit} ", "f") == dt.timedelta(seconds=count * UNITS[unit])


@given(st.text(max_size=12))
def test_any_text_parses_or_is_one_line_error(text: str) -> None:
    try:
        value = parse_duration(text, "field")
    except DurationError as exc:
        assert str(exc).startswith("field: ") and "\n" not in str(exc)
        assert is_duration(text) == (exc.problem in (Problem.NOT_POSITIVE, Problem.TOO_LONG))
    else:
        assert value >= dt.timedelta(0) and is_duration(text)

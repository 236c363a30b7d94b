"""Pure parts: time and filter parsing, cursors, store targets, the retention decision."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshgate.audit.open import parse_target, store_target
from meshgate.audit.query import (
    build_query,
    decode_cursor,
    encode_cursor,
    parse_instant,
)
from meshgate.audit.retention import plan_retention
from meshgate.durations import parse_duration
from meshgate.errors import ConfigError

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("1h", 3600),
        ("7d", 7 * 86400),
        ("2w", 14 * 86400),
        ("1.5h", 5400),
        (" 24h ", 86400),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text, "--since") == dt.timedelta(seconds=seconds)


def test_instants() -> None:
    assert parse_instant("1h", "--since", NOW) == NOW - dt.timedelta(hours=1)
    assert parse_instant("now", "--until", NOW) == NOW
    assert parse_instant("2026-11-24T08:00:00Z", "--since", NOW) == dt.datetime(
        2026, 11, 24, 8, tzinfo=dt.UTC
    )
    assert parse_instant("2026-11-24T10:00:00+02:00", "--since", NOW) == dt.datetime(
        2026, 11, 24, 8, tzinfo=dt.UTC
    )
    assert parse_instant("2026-11-24", "--since", NOW) == dt.datetime(2026, 11, 24, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"since": "yesterdayish"}, "--since: 'yesterdayish' is neither a duration"),
        ({"until": "5 parsecs"}, "--until: '5 parsecs' is neither"),
        ({"decision": "maybe"}, "--decision: 'maybe' is not one of allowed, denied"),
        ({"limit": 0}, "--limit: must be between 1 and 10000"),
        ({"limit": "many"}, "--limit: 'many' is not a number"),
        ({"cursor": "%%%"}, "--cursor: '%%%' is not a cursor"),
        ({"since": "1h", "until": "2h"}, "--since must be before --until"),
    ],
)
def test_bad_filters_name_the_option(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_query(now=NOW, **kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_bad_filter_uses_the_callers_spelling() -> None:
    with pytest.raises(ConfigError, match=r"^decision: 'x'"):
        build_query(decision="x", names={"decision": "decision"})


def test_good_query() -> None:
    q = build_query(agent="coder", decision="denied", since="1h", limit="50", now=NOW)
    assert (q.agent, q.decision, q.since, q.until, q.limit) == (
        "coder",
        "denied",
        NOW - dt.timedelta(hours=1),
        None,
        50,
    )


@given(st.integers(min_value=-(2**62), max_value=2**62), st.integers(min_value=0, max_value=2**62))
def test_cursor_round_trip(ts_us: int, record_id: int) -> None:
    cursor = encode_cursor(ts_us, record_id)
    assert decode_cursor(cursor) == (ts_us, record_id)
    assert cursor.isascii() and "=" not in cursor


def test_store_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHGATE_AUDIT_STORE", raising=False)
    assert store_target(None, tmp_path) == str(tmp_path / "audit.db")
    monkeypatch.setenv("MESHGATE_AUDIT_STORE", "postgresql://h/db")
    assert store_target(None, tmp_path) == "postgresql://h/db"
    assert store_target("/x.db", tmp_path) == "/x.db"
    assert parse_target("sqlite:////var/a.db").location == "/var/a.db"
    assert parse_target("sqlite:///var/a.db").location == "/var/a.db"
    assert parse_target("sqlite:rel.db").location == "rel.db"
    assert parse_target("state/audit.db").kind == "sqlite"
    pg = parse_target("postgresql://u:p@h:5432/db?schema=audit_a&sslmode=disable")
    assert (pg.kind, pg.location, pg.schema) == (
        "postgresql",
        "postgresql://u:p@h:5432/db?sslmode=disable",
        "audit_a",
    )
    assert parse_target("postgres://h/db").schema is None
    with pytest.raises(ConfigError, match="use a path, sqlite:///path or postgresql://"):
        parse_target("mysql://h/db")


def test_retention_plan_takes_only_an_old_prefix() -> None:
    rows = [(1, 10, 100, "h1"), (2, 20, 200, "h2"), (3, 30, 500, "h3"), (4, 40, 150, "h4")]
    plan = plan_retention(rows, cutoff_us=300)
    assert plan is not None and (plan.seq, plan.last_id, plan.hash, plan.batches) == (
        2,
        20,
        "h2",
        2,
    )
    assert plan_retention(rows, cutoff_us=100) is None  # max_ts 100 is not older than 100
    assert plan_retention([], cutoff_us=10**9) is None
    everything = plan_retention(rows, cutoff_us=10**9)
    assert everything is not None and everything.seq == 4

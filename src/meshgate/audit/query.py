"""Turning user input into an AuditQuery: durations, instants, decisions and opaque cursors.

Shared by the CLI and the admin HTTP API, so both accept the same `--since 1h` and both refuse
bad input with one message naming the option. Pagination is newest first, keyset on
(timestamp, id): a cursor is the position of the last record returned.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt

from meshgate.audit.record import DECISIONS, Decision
from meshgate.audit.store import AuditQuery
from meshgate.durations import is_duration, parse_duration
from meshgate.errors import ConfigError

MAX_LIMIT = 10_000


def parse_instant(text: str, option: str, now: dt.datetime | None = None) -> dt.datetime:
    """A duration back from now (`1h`), `now`, or an ISO 8601 time (UTC when no offset)."""
    now = now or dt.datetime.now(dt.UTC)
    if text.strip().lower() == "now":
        return now
    if is_duration(text, bare=False):  # a bare number could be an ISO basic date (20261124)
        try:
            return now - parse_duration(text, option)
        except OverflowError:
            raise ConfigError(f"{option}: {text!r} reaches back before the year 1") from None
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"{option}: {text!r} is neither a duration (1h, 7d) nor an ISO 8601 time"
        ) from None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def parse_decision(text: str | None, option: str = "--decision") -> Decision | None:
    if text is None or text == "":
        return None
    if text not in DECISIONS:
        raise ConfigError(f"{option}: {text!r} is not one of {', '.join(DECISIONS)}")
    return text


def parse_limit(text: str | int, option: str = "--limit") -> int:
    try:
        limit = int(text)
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"{option}: must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def encode_cursor(ts_us: int, record_id: int) -> str:
    return base64.urlsafe_b64encode(f"{ts_us}:{record_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, option: str = "--cursor") -> tuple[int, int]:
    """(timestamp in UTC microseconds, record id) of the last record of the previous page."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts_text, id_text = raw.split(":")
        return int(ts_text), int(id_text)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ConfigError(f"{option}: {cursor!r} is not a cursor from a previous page") from None


def build_query(
    *,
    agent: str | None = None,
    destination: str | None = None,
    decision: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: str | int = 100,
    cursor: str | None = None,
    tool: str | None = None,
    now: dt.datetime | None = None,
    names: dict[str, str] | None = None,
) -> AuditQuery:
    """Validate every filter; `names` maps a field to how the caller spells it in errors."""
    n = {
        "decision": "--decision",
        "since": "--since",
        "until": "--until",
        "limit": "--limit",
        "cursor": "--cursor",
        **(names or {}),
    }
    now = now or dt.datetime.now(dt.UTC)
    start = parse_instant(since, n["since"], now) if since else None
    end = parse_instant(until, n["until"], now) if until else None
    if start is not None and end is not None and start >= end:
        raise ConfigError(f"{n['since']} must be before {n['until']}")
    if cursor:
        decode_cursor(cursor, n["cursor"])
    return AuditQuery(
        agent=agent or None,
        destination=destination or None,
        decision=parse_decision(decision, n["decision"]),
        tool=tool or None,
        since=start,
        until=end,
        limit=parse_limit(limit, n["limit"]),
        cursor=cursor or None,
    )

"""The chain itself: stable encoding, and any one-character edit of any stored record is found."""

from __future__ import annotations

import datetime as dt
import sqlite3
import tempfile
from pathlib import Path

from audit_fixtures import make_record, make_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshgate.audit.chain import (
    GENESIS,
    ChainState,
    batch_hash,
    canonical,
    digest,
    from_micros,
    make_batch,
    to_micros,
)
from meshgate.audit.sqlbase import FIELDS
from meshgate.audit.sqlite_store import SqliteAuditStore

COUNTS = ("status", "bytes_sent", "bytes_received", "tokens_in", "tokens_out", "cost_micro_usd")
TEXT = [f for f in FIELDS if f not in (*COUNTS, "duration_ms")]
NUMBERS = ["ts_us", *COUNTS, "duration_ms"]


def test_canonical_encoding_is_fixed() -> None:
    """The encoding is the chain's wire format: changing it silently breaks every stored log."""
    assert (
        canonical(make_record(7))
        == (
            '[1793534407000000,"req-000007","a1","spiffe://mesh.local/agent/a1","d1","d1.example",'
            '"GET","/v1/items/7?q=ünï",403,"upstream_error","not_allowlisted",70,7,1.0,"abc123",'
            '"gateway/main"]'
        ).encode()
    )
    assert digest(make_record(7)).hex() == (
        "fa3122078e10d4405034e39e9ae1ab6ccd603fa573001f1b350b96d4ae9c51ce"
    )


def test_batch_hash_covers_position_and_predecessor() -> None:
    records = make_records(3)
    first = make_batch(ChainState(), records)
    assert (first.seq, first.first_id, first.last_id, first.prev_hash) == (1, 1, 3, GENESIS)
    assert first.hash == batch_hash(GENESIS, 1, 1, first.digests)
    assert batch_hash("1" * 64, 1, 1, first.digests) != first.hash
    assert batch_hash(GENESIS, 2, 1, first.digests) != first.hash
    assert batch_hash(GENESIS, 1, 2, first.digests) != first.hash
    state = ChainState(head_seq=1, head_hash=first.hash, head_last_id=3)
    second = make_batch(state, make_records(2, start=3))
    assert (second.seq, second.first_id, second.prev_hash) == (2, 4, first.hash)


@given(
    st.datetimes(
        min_value=dt.datetime(1970, 1, 1),
        max_value=dt.datetime(2200, 1, 1),
        timezones=st.just(dt.UTC),
    )
)
def test_micros_round_trip(when: dt.datetime) -> None:
    assert from_micros(to_micros(when)) == when


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    victim=st.integers(min_value=1, max_value=12),
    column=st.sampled_from(TEXT + NUMBERS),
    position=st.integers(min_value=0, max_value=200),
    replacement=st.characters(exclude_categories=("Cs",)),
    delta=st.integers(min_value=1, max_value=2**40),
)
def test_any_single_edit_of_any_record_is_detected(
    victim: int, column: str, position: int, replacement: str, delta: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.db"
        store = SqliteAuditStore(path, synchronous="OFF")
        store.append(make_records(5))
        store.append(make_records(7, start=5))
        conn = sqlite3.connect(path)
        (old,) = conn.execute(f"SELECT {column} FROM audit_records WHERE id = ?", (victim,))
        value = old[0]
        if column in TEXT:
            i = position % max(len(value), 1)
            if value and value[i] == replacement:
                replacement = chr(ord(replacement) ^ 1) if ord(replacement) ^ 1 < 0xD800 else "x"
            new = value[:i] + replacement + value[i + 1 :] if value else replacement
        elif column == "duration_ms":
            new = value + delta / 1024
        else:
            new = value + delta if position % 2 else value - delta
        assert new != value
        with conn:
            conn.execute(f"UPDATE audit_records SET {column} = ? WHERE id = ?", (new, victim))
        conn.close()
        problems = store.verify().problems
        store.close()
    assert [(p.kind, p.record_id) for p in problems] == [("edited", victim)]


def test_later_field_groups_encode_only_when_used() -> None:
    """Records from before the MCP and the pacer's fields encode as they always did (so stored
    chains still verify); a record using a later group encodes every group up to it."""
    plain = canonical(make_record(7))
    assert plain.count(b",") == 15  # the first 16 values
    mcp = canonical(make_record(7, mcp_method="tools/call"))
    assert mcp.endswith(b',"tools/call",""]')
    llm = canonical(make_record(7, model="gpt-4o-mini", tokens_in=12, cost_micro_usd=3))
    assert llm.endswith(b',"","","gpt-4o-mini",12,0,3,""]')
    assert digest(make_record(7, tokens_out=1)) != digest(make_record(7))

"""Tamper evidence on both stores: verify names the record or batch that was altered."""

from __future__ import annotations

import datetime as dt

import pytest
from audit_fixtures import T0, StoreEnv, make_records

from meshgate.audit.sqlbase import AuditStoreError, SqlAuditStore


@pytest.fixture
def filled(store_env: StoreEnv) -> SqlAuditStore:
    """40 records in 4 batches of 10: ids 1..40, batch k holds ids 10k-9..10k."""
    store = store_env.open()
    for b in range(4):
        assert store.append(make_records(10, start=b * 10)) == 10
    return store


def kinds(store: SqlAuditStore) -> list[tuple[str, int | None, int | None]]:
    return [(p.kind, p.seq, p.record_id) for p in store.verify().problems]


def test_intact_log_verifies(filled: SqlAuditStore) -> None:
    report = filled.verify()
    assert report.ok and (report.records, report.batches, report.head_seq) == (40, 4, 4)


def test_empty_log_verifies(store: SqlAuditStore) -> None:
    report = store.verify()
    assert report.ok and (report.records, report.batches) == (0, 0)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("agent", "someone-else"),
        ("status", 200),
        ("ts_us", 1),
        ("duration_ms", 0.25),
        ("reason", ""),
        ("path", "/v1/items/13?q=ünI"),
    ],
)
def test_edited_record_is_named(
    filled: SqlAuditStore, store_env: StoreEnv, column: str, value: object
) -> None:
    store_env.raw(f"UPDATE audit_records SET {column} = ? WHERE id = 14", [value])
    report = filled.verify()
    assert [(p.kind, p.seq, p.record_id, p.request_id) for p in report.problems] == [
        ("edited", 2, 14, "req-000013")
    ]


def test_deleted_record_is_named(filled: SqlAuditStore, store_env: StoreEnv) -> None:
    store_env.raw("DELETE FROM audit_records WHERE id = 25", [])
    assert kinds(filled) == [("deleted", 3, 25)]
    assert "9 of 10 records present" in filled.verify().problems[0].message


def test_reordered_records_are_named(filled: SqlAuditStore, store_env: StoreEnv) -> None:
    for sql, params in [
        ("UPDATE audit_records SET id = ? WHERE id = ?", [-1, 12]),
        ("UPDATE audit_records SET id = ? WHERE id = ?", [12, 13]),
        ("UPDATE audit_records SET id = ? WHERE id = ?", [13, -1]),
    ]:
        store_env.raw(sql, params)
    problems = filled.verify().problems
    assert [(p.kind, p.record_id) for p in problems] == [("reordered", 12), ("reordered", 13)]
    assert "appended as id 13" in problems[0].message


def test_deleted_batch_with_its_records(filled: SqlAuditStore, store_env: StoreEnv) -> None:
    store_env.raw("DELETE FROM audit_records WHERE id BETWEEN 11 AND 20", [])
    store_env.raw("DELETE FROM audit_batches WHERE seq = 2", [])
    problems = filled.verify().problems
    assert [(p.kind, p.seq) for p in problems] == [("batch_missing", 3)]
    assert "batch 2 missing" in problems[0].message


def test_deleted_batch_row_leaves_its_records_unchained(
    filled: SqlAuditStore, store_env: StoreEnv
) -> None:
    store_env.raw("DELETE FROM audit_batches WHERE seq = 3", [])
    got = kinds(filled)
    assert got == [*(("unchained", None, i) for i in range(21, 31)), ("batch_missing", 4, None)]


def test_deleted_trailing_batch_is_caught_by_the_head(
    filled: SqlAuditStore, store_env: StoreEnv
) -> None:
    store_env.raw("DELETE FROM audit_records WHERE id > 30", [])
    store_env.raw("DELETE FROM audit_batches WHERE seq = 4", [])
    assert kinds(filled) == [("head_mismatch", 4, None)]


def test_altered_batch_row_is_named(filled: SqlAuditStore, store_env: StoreEnv) -> None:
    store_env.raw("UPDATE audit_batches SET prev_hash = ? WHERE seq = 3", ["f" * 64])
    got = kinds(filled)
    assert ("chain_broken", 3, None) in got and ("batch_tampered", 3, None) in got


def test_rewritten_record_and_digest_still_breaks_the_chain(
    filled: SqlAuditStore, store_env: StoreEnv
) -> None:
    """Recomputing the one record's digest is not enough: the batch hash covers the digests."""
    from meshgate.audit.chain import digest

    rows = filled.tail(10, limit=10)
    forged = [r if i != 12 else r.__class__(**{**r.__dict__, "agent": "x"}) for i, r in rows]
    digests = b"".join(digest(r) for r in forged)
    store_env.raw("UPDATE audit_records SET agent = 'x' WHERE id = 12", [])
    store_env.raw("UPDATE audit_batches SET digests = ? WHERE seq = 2", [digests])
    assert kinds(filled) == [("batch_tampered", 2, None)]


def test_inserted_record_is_unchained(filled: SqlAuditStore, store_env: StoreEnv) -> None:
    cols = (
        "id, ts_us, request_id, agent, spiffe_id, destination, host, method, path, status, "
        "decision, reason, bytes_sent, bytes_received, duration_ms, policy_version, gateway"
    )
    store_env.raw(
        f"INSERT INTO audit_records ({cols}) VALUES (41, 1, 'forged', 'a', 's', 'd', 'h', 'GET',"
        " '/', 200, 'allowed', '', 0, 0, 0.0, 'v', 'g')",
        [],
    )
    problems = filled.verify().problems
    assert [(p.kind, p.record_id, p.request_id) for p in problems] == [("unchained", 41, "forged")]
    # and the next real append still chains after the head, not after the forged row
    with pytest.raises(AuditStoreError, match="record ids from 41 are taken"):
        filled.append(make_records(1, start=99))  # refused: it would chain over a forged row
    assert filled.verify().records == 41  # and rolled back


def test_retain_then_verify_passes_and_new_batches_chain_on(filled: SqlAuditStore) -> None:
    cutoff = T0 + dt.timedelta(seconds=25)  # batches 1 and 2 (records 0..19) are all older
    result = filled.retain(cutoff)
    assert (result.batches, result.records, result.anchor_seq) == (2, 20, 2)
    report = filled.verify()
    assert report.ok, report.problems
    assert (report.records, report.batches, report.anchor_seq) == (20, 2, 2)
    assert filled.append(make_records(5, start=100)) == 5
    assert filled.verify().ok
    assert filled.retain(cutoff).batches == 0  # idempotent
    assert filled.retain(T0 + dt.timedelta(days=1)).batches == 3  # everything
    report = filled.verify()
    assert report.ok and report.records == 0


def test_retain_stops_at_the_first_recent_batch(filled: SqlAuditStore) -> None:
    filled.append(make_records(10, start=-100))  # old timestamps, but appended last
    result = filled.retain(T0 + dt.timedelta(seconds=15))
    assert (result.batches, result.anchor_seq) == (1, 1)  # batch 2 holds 15..19: stop there
    assert filled.verify().ok


def test_retain_then_tamper_fails(filled: SqlAuditStore, store_env: StoreEnv) -> None:
    filled.retain(T0 + dt.timedelta(seconds=25))
    store_env.raw("UPDATE audit_records SET decision = 'allowed' WHERE id = 34", [])
    assert kinds(filled) == [("edited", 4, 34)]


def test_deleting_the_first_batch_after_retention_is_caught(
    filled: SqlAuditStore, store_env: StoreEnv
) -> None:
    filled.retain(T0 + dt.timedelta(seconds=15))
    store_env.raw("DELETE FROM audit_records WHERE id BETWEEN 11 AND 20", [])
    store_env.raw("DELETE FROM audit_batches WHERE seq = 2", [])
    assert kinds(filled) == [("batch_missing", 3, None)]


def test_forged_batch_time_range_is_caught(filled: SqlAuditStore, store_env: StoreEnv) -> None:
    """Retention trusts max_ts_us, so verify checks it against the (hashed) records."""
    store_env.raw("UPDATE audit_batches SET max_ts_us = 0 WHERE seq = 4", [])
    assert kinds(filled) == [("batch_tampered", 4, None)]

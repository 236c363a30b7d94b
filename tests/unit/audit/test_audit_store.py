"""Append, dedup, query, pagination, summary and tail: the same tests on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading

import psycopg
import pytest
from audit_fixtures import T0, StoreEnv, make_record, make_records

from meshgate.audit.query import decode_cursor
from meshgate.audit.sqlbase import SqlAuditStore
from meshgate.audit.store import AuditQuery
from meshgate.errors import ConfigError


def all_pages(store: SqlAuditStore, query: AuditQuery) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        page = store.query(AuditQuery(**{**query.__dict__, "cursor": cursor}))
        pages.append([r.request_id for r in page.records])
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


def test_append_returns_new_count_and_skips_duplicates(store: SqlAuditStore) -> None:
    assert store.append(make_records(10)) == 10
    assert store.append(make_records(10, start=5)) == 5  # 5..9 known, 10..14 new
    dup = make_record(20)
    assert store.append([dup, dup, make_record(21)]) == 2  # a duplicate inside one batch
    assert store.append(make_records(3)) == 0
    assert store.append([]) == 0
    ids = [r.request_id for r in store.query(AuditQuery(limit=100)).records]
    assert sorted(ids) == sorted({f"req-{i:06d}" for i in [*range(15), 20, 21]})
    report = store.verify()
    assert report.ok, report.problems
    assert (report.records, report.batches) == (17, 3)  # empty and all-duplicate batches: none


def test_a_batch_larger_than_one_insert_is_stored_whole_in_order(store: SqlAuditStore) -> None:
    # SQLite inserts 500 rows per statement, PostgreSQL copies: 1,234 spans several statements
    records = make_records(1234)
    assert store.append([records[0], *records, records[-1]]) == 1234  # (duplicates skipped)
    assert store.append(make_records(1300)) == 66
    rows = store.tail(0, limit=5000)
    assert [record_id for record_id, _ in rows] == list(range(1, 1301))  # ids in append order
    assert [r for _, r in rows] == make_records(1300)
    report = store.verify()
    assert report.ok, report.problems
    assert (report.records, report.batches) == (1300, 2)


def test_records_round_trip_exactly(store: SqlAuditStore) -> None:
    records = make_records(30)
    store.append(records)
    got = store.query(AuditQuery(limit=100)).records
    assert got == sorted(records, key=lambda r: r.timestamp, reverse=True)


def test_filters_combine(store: SqlAuditStore) -> None:
    records = make_records(120)
    store.append(records)
    since, until = T0 + dt.timedelta(seconds=30), T0 + dt.timedelta(seconds=90)
    query = AuditQuery(agent="a1", decision="denied", since=since, until=until, limit=1000)
    got = store.query(query).records
    want = [
        r
        for r in records
        if r.agent == "a1" and r.decision == "denied" and since <= r.timestamp < until
    ]
    assert want and got == sorted(want, key=lambda r: r.timestamp, reverse=True)
    by_dest = store.query(AuditQuery(destination="d1", limit=1000)).records
    assert {r.destination for r in by_dest} == {"d1"} and len(by_dest) == 60


def test_pagination_is_newest_first_and_complete_with_equal_timestamps(
    store: SqlAuditStore,
) -> None:
    same = T0 + dt.timedelta(hours=1)
    records = make_records(25) + [make_record(100 + i, timestamp=same) for i in range(12)]
    for i in range(0, len(records), 7):  # several batches
        store.append(records[i : i + 7])
    pages = all_pages(store, AuditQuery(limit=5))
    flat = [rid for page in pages for rid in page]
    assert len(pages) == 8 and all(len(p) == 5 for p in pages[:-1])
    assert len(flat) == len(set(flat)) == 37
    # the 12 records sharing one timestamp come first (newest), by id descending
    assert flat[:12] == [f"req-{100 + i:06d}" for i in reversed(range(12))]
    assert flat[12:] == [f"req-{i:06d}" for i in reversed(range(25))]


def test_cursor_pages_are_stable_while_new_records_arrive(store: SqlAuditStore) -> None:
    store.append(make_records(20))
    first = store.query(AuditQuery(limit=10))
    assert first.next_cursor is not None
    store.append(make_records(5, start=1000))  # newer: must not shift the next page
    second = store.query(AuditQuery(limit=10, cursor=first.next_cursor))
    assert [r.request_id for r in second.records] == [f"req-{i:06d}" for i in range(9, -1, -1)]
    assert second.next_cursor is None
    ts_us, _ = decode_cursor(first.next_cursor)
    assert ts_us == int(
        (first.records[-1].timestamp - dt.datetime(1970, 1, 1, tzinfo=dt.UTC))
        / dt.timedelta(microseconds=1)
    )


def test_summary_counts_agent_destination_decision(store: SqlAuditStore) -> None:
    records = make_records(60)
    store.append(records)
    since = T0 + dt.timedelta(seconds=12)
    rows = store.summary(since=since)
    want: dict[tuple[str, str, str], int] = {}
    for r in records:
        if r.timestamp >= since:
            key = (r.agent, r.destination, r.decision)
            want[key] = want.get(key, 0) + 1
    assert {(r.agent, r.destination, r.decision): r.count for r in rows} == want
    assert sum(r.count for r in store.summary()) == 60
    assert store.summary(until=T0) == []


def test_summary_by_tool_and_model_adds_up_tokens_and_cost(store: SqlAuditStore) -> None:
    store.append(
        [
            make_record(1, mcp_method="tools/call", mcp_tool="create_issue"),
            make_record(2, mcp_method="tools/call", mcp_tool="create_issue"),
            make_record(3, model="gpt-4o-mini", tokens_in=10, tokens_out=5, cost_micro_usd=20),
            make_record(4, model="gpt-4o-mini", tokens_in=1, tokens_out=2, cost_micro_usd=5),
            make_record(5, model="claude", tokens_in=7, tokens_out=0, cost_micro_usd=9),
        ]
    )
    by_tool = {r.tool: r.count for r in store.summary(by=("tool",))}
    assert by_tool == {"create_issue": 2, "": 3}
    models = {r.model: r for r in store.summary(by=("model",))}
    mini = models["gpt-4o-mini"]
    assert (mini.count, mini.tokens_in, mini.tokens_out, mini.cost_micro_usd) == (2, 11, 7, 25)
    assert mini.to_json(("model",)) == {
        "model": "gpt-4o-mini",
        "count": 2,
        "tokens_in": 11,
        "tokens_out": 7,
        "cost_micro_usd": 25,
    }
    assert models[""].to_json(("model",)) == {"model": "", "count": 2}
    with pytest.raises(ConfigError, match="one or more of"):
        store.summary(by=("path",))


def test_tail_follows_ids_in_append_order(store: SqlAuditStore) -> None:
    assert store.last_id() == 0 and store.tail(0) == []
    store.append(make_records(5, start=50))
    store.append(make_records(5))  # older timestamps, appended later
    last = store.last_id()
    assert last == 10
    tail = store.tail(3, limit=4)
    assert [i for i, _ in tail] == [4, 5, 6, 7]
    assert [r.request_id for _, r in tail] == [
        "req-000053",
        "req-000054",
        "req-000000",
        "req-000001",
    ]
    assert store.tail(last) == []


def test_two_replicas_appending_concurrently_do_not_fork_the_chain(store_env: StoreEnv) -> None:
    """Two connections (replicas) append at once; the chain stays one line with no gaps."""
    replicas = [store_env.open(), store_env.open()]
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            for b in range(20):
                start = n * 100_000 + b * 50
                replicas[n].append(
                    make_records(50, start=start) + make_records(5, start=500_000 + b * 3)
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    report = replicas[0].verify()
    assert report.ok, report.problems
    assert report.records == 2 * 20 * 50 + len({b * 3 + k for b in range(20) for k in range(5)})
    assert replicas[1].last_id() == report.records
    for r in replicas:
        r.close()


def test_reopening_keeps_records_and_chain(store_env: StoreEnv) -> None:
    first = store_env.open()
    first.append(make_records(10))
    first.close()
    again = store_env.open()
    assert again.append(make_records(12)) == 2
    report = again.verify()
    assert report.ok and (report.records, report.batches) == (12, 2)
    again.close()


@pytest.mark.parametrize("store_env", ["postgres"], indirect=True)
def test_postgres_store_reconnects_after_the_server_drops_it(store_env: StoreEnv) -> None:
    store = store_env.open()
    store.append(make_records(3))
    pid = store._conn.info.backend_pid  # only this store's own connection
    store_env.raw("SELECT pg_terminate_backend(?)", [pid])
    with pytest.raises(psycopg.OperationalError):
        store.append(make_records(3, start=3))  # the operation that meets the break fails
    assert store.append(make_records(3, start=3)) == 3  # the next one reconnects
    report = store.verify()
    assert report.ok and report.records == 6
    store.close()


def test_a_resend_is_skipped_but_no_node_can_pre_empt_another(store: SqlAuditStore) -> None:
    gateway = make_record(1, gateway="gateway/egress")
    assert store.append([gateway]) == 1
    assert store.append([gateway, gateway]) == 0  # the shipper resending after a crash
    # a sidecar reporting the same start time and request id is not the gateway's record
    forged = make_record(1, gateway="agent/coder/1", agent="coder")
    assert store.append([forged]) == 1
    page = store.query(AuditQuery(limit=10))
    assert sorted(r.gateway for r in page.records) == ["agent/coder/1", "gateway/egress"]

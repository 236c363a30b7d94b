"""MCP method and tool in audit records: stored, queried with --tool, and migrated into stores
created before the columns existed (SQLite and PostgreSQL alike), with the chain still intact."""

from __future__ import annotations

from audit_fixtures import StoreEnv, make_record, make_records

from meshgate.audit.chain import canonical
from meshgate.audit.query import build_query
from meshgate.audit.sqlbase import SqlAuditStore


def test_tool_fields_are_stored_and_filtered(store: SqlAuditStore) -> None:
    calls = [
        make_record(1, mcp_method="tools/call", mcp_tool="read_file"),
        make_record(2, mcp_method="tools/call", mcp_tool="write_file", decision="denied"),
        make_record(3, mcp_method="tools/list"),
        make_record(4),
    ]
    assert store.append(calls) == 4
    page = store.query(build_query(tool="write_file"))
    assert [(r.request_id, r.mcp_method, r.mcp_tool) for r in page.records] == [
        ("req-000002", "tools/call", "write_file")
    ]
    everything = {r.request_id: r for r in store.query(build_query()).records}
    assert everything["req-000003"].mcp_method == "tools/list"
    assert everything["req-000004"].mcp_method == "" and everything["req-000004"].mcp_tool == ""
    assert store.verify().ok


def test_records_without_mcp_fields_encode_as_before() -> None:
    """Chains written before the fields existed still verify: the canonical bytes are unchanged."""
    plain = make_record(7)
    assert b"tools" not in canonical(plain)
    assert canonical(plain).count(b",") == 15  # the 16 original values
    assert canonical(make_record(7, mcp_tool="read_file")) != canonical(plain)


def test_an_old_store_gains_the_columns_and_still_verifies(store_env: StoreEnv) -> None:
    old = store_env.open()
    assert old.append(make_records(5)) == 5
    old.close()
    # what a store created by the previous release looks like: no MCP columns, no tool index
    store_env.raw("DROP INDEX audit_records_tool", ())
    store_env.raw("ALTER TABLE audit_records DROP COLUMN mcp_tool", ())
    store_env.raw("ALTER TABLE audit_records DROP COLUMN mcp_method", ())

    migrated = store_env.open()
    try:
        assert migrated.verify().ok
        assert all(r.mcp_method == "" for r in migrated.query(build_query()).records)
        new = make_record(10, mcp_method="tools/call", mcp_tool="search_code")
        assert migrated.append([new]) == 1
        found = migrated.query(build_query(tool="search_code")).records
        assert [r.request_id for r in found] == ["req-000010"]
        report = migrated.verify()
        assert report.ok, report.to_json()
    finally:
        migrated.close()
    again = store_env.open()  # opening a migrated store changes nothing
    try:
        assert again.verify().ok and len(again.query(build_query()).records) == 6
    finally:
        again.close()

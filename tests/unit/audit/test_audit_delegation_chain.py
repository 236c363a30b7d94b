"""The delegation chain in audit records: a new last field group, so records and chains stored
before it still encode and verify as they did; stores from before it gain the column."""

from __future__ import annotations

from audit_fixtures import StoreEnv, make_record, make_records

from meshgate.audit.chain import canonical
from meshgate.audit.query import build_query
from meshgate.audit.sqlbase import SqlAuditStore


def test_records_without_a_chain_encode_as_before() -> None:
    digest_era = canonical(make_record(7, mcp_args_digest="ab"))
    assert digest_era.endswith(b',"ab"]') and digest_era.count(b",") == 22  # the 23 values
    chained = canonical(make_record(7, delegation_chain="sup>web-1"))
    # the shadow group (2 values) sits between: empty, written out so the chain's position holds
    assert chained.endswith(b',0,0,0,"","","","sup>web-1"]') and chained.count(b",") == 25
    assert canonical(make_record(7)) == canonical(make_record(7, delegation_chain=""))


def test_the_chain_is_stored_and_covered_by_the_hash_chain(store: SqlAuditStore) -> None:
    assert store.append([make_record(1, delegation_chain="sup>web-1"), make_record(2)]) == 2
    got = {r.request_id: r.delegation_chain for r in store.query(build_query()).records}
    assert got == {"req-000001": "sup>web-1", "req-000002": ""}
    assert store.verify().ok


def test_an_old_store_gains_the_column_and_still_verifies(store_env: StoreEnv) -> None:
    old = store_env.open()
    assert old.append(make_records(3)) == 3
    assert old.append([make_record(4, model="m", tokens_in=3, mcp_args_digest="d")]) == 1
    old.close()
    store_env.raw("ALTER TABLE audit_records DROP COLUMN delegation_chain", ())
    migrated = store_env.open()
    try:
        assert migrated.verify().ok
        assert migrated.append([make_record(10, delegation_chain="sup>web-1")]) == 1
        report = migrated.verify()
        assert report.ok, report.to_json()
        chains = [r.delegation_chain for r in migrated.query(build_query()).records]
        assert sorted(chains) == ["", "", "", "", "sup>web-1"]
    finally:
        migrated.close()

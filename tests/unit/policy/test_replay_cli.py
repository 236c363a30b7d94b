"""`meshgate plan --replay`: records read from SQLite and PostgreSQL, the candidate from a
directory or a git ref, the report as a table or JSON, and the exit code a CI check gates on."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from audit_fixtures import pg_url
from typer.testing import CliRunner

from meshgate.audit.record import AuditRecord
from meshgate.audit.sqlbase import SqlAuditStore
from meshgate.audit.sqlite_store import SqliteAuditStore
from meshgate.cli import app
from meshgate.policy.loader import load_policy_dir
from meshgate.replay.compare import replay
from meshgate.replay.records import read_groups, to_groups
from meshgate.replay.routes import PolicyRoutes

runner = CliRunner()
NOW = dt.datetime.now(dt.UTC)

MESH = """\
apiVersion: meshgate.dev/v1
kind: Mesh
metadata: {name: default}
spec:
  trustDomain: agents.test
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: api}
spec: {host: api.internal, port: 80, tls: none, address: "127.0.0.1:9001"}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: mcp}
spec: {host: mcp.internal, port: 80, tls: none, address: "127.0.0.1:9002"}
"""

CURRENT = """\
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: coder}
spec:
  agent: coder
  egress:
    - destination: api
      methods: [GET]
      paths: ["/v1/*"]
    - destination: mcp
      methods: [POST]
      paths: ["/mcp"]
      tools: [read_file, search]
"""

# drops `search` and narrows api to /v1/items/*
CANDIDATE = CURRENT.replace("read_file, search", "read_file").replace("/v1/*", "/v1/items/*")


def write(directory: Path, agents: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mesh.yaml").write_text(MESH)
    (directory / "agents.yaml").write_text(agents)
    return directory


def record(n: int, **fields: Any) -> AuditRecord:
    base: dict[str, Any] = {
        "timestamp": NOW - dt.timedelta(hours=1, seconds=n),
        "request_id": f"r{n}",
        "agent": "coder",
        "spiffe_id": "spiffe://agents.test/agent/coder",
        "destination": "api",
        "host": "api.internal",
        "method": "GET",
        "path": "/v1/items/1",
        "status": 200,
        "decision": "allowed",
        "reason": "",
        "bytes_sent": 10,
        "bytes_received": 0,
        "duration_ms": 1.0,
        "policy_version": "v1",
        "gateway": "gateway/main",
    }
    base.update(fields)
    return AuditRecord(**base)


def traffic() -> list[AuditRecord]:
    out = [record(i) for i in range(50)]  # unchanged
    out += [record(100 + i, path="/v1/users") for i in range(7)]  # newly refused
    out += [
        record(
            200 + i,
            destination="mcp",
            host="mcp.internal",
            method="POST",
            path="/mcp",
            bytes_received=80,
            mcp_method="tools/call",
            mcp_tool="search",
        )
        for i in range(4)
    ]  # newly refused: tool_denied
    out += [
        record(300, path="/v1/items/1", status=403, decision="denied", reason="path_not_canonical")
    ]
    out += [record(400, timestamp=NOW - dt.timedelta(days=30))]  # before --since
    out += [record(500, gateway="agent/coder/x", decision="upstream_error", reason="UF")]
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        store: SqlAuditStore = SqliteAuditStore(tmp_path / "audit.db")
        store.append(traffic())
        store.close()
        yield str(tmp_path / "audit.db")
        return
    url = pg_url()
    if not url:
        pytest.skip("MESHGATE_TEST_POSTGRES is set empty: PostgreSQL tests skipped on request")
    import psycopg

    from meshgate.audit.postgres_store import PostgresAuditStore

    schema = f"t_{uuid.uuid4().hex[:12]}"
    store = PostgresAuditStore(url, schema=schema)
    store.append(traffic())
    store.close()
    try:
        yield f"{url}?schema={schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_both_stores_stream_the_same_groups(store_url: str, tmp_path: Path) -> None:
    groups = read_groups(store_url, since=NOW - dt.timedelta(days=7))
    assert sum(v[0] for v in groups.values()) == 63
    report = replay(
        to_groups(groups), PolicyRoutes(load_policy_dir(write(tmp_path / "c", CANDIDATE)))
    )
    assert (report.newly_refused, report.newly_allowed, report.unchanged) == (11, 0, 50)
    assert report.not_replayed == {
        "denied: path_not_canonical": 1,
        "logged by a sidecar (never reached a gateway)": 1,
    }
    everything = read_groups(store_url)
    assert sum(v[0] for v in everything.values()) == 64


def test_batches_cross_keyset_boundaries(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = read_groups(store_url)
    monkeypatch.setattr("meshgate.replay.records.BATCH", 5)
    assert read_groups(store_url) == whole
    monkeypatch.setattr("meshgate.replay.records.BATCH", 64)  # exactly one full batch, then none
    assert read_groups(store_url) == whole


def test_cli_json_report_and_exit_code(tmp_path: Path) -> None:
    store = SqliteAuditStore(tmp_path / "audit.db")
    store.append(traffic())
    store.close()
    db = str(tmp_path / "audit.db")
    candidate = write(tmp_path / "candidate", CANDIDATE)
    result = runner.invoke(
        app, ["plan", "--replay", str(candidate), "--store", db, "--format", "json"]
    )
    assert result.exit_code == 2, result.output
    data = json.loads(result.stdout)
    assert data["newly_refused"] == 11 and data["records"] == 63
    rows = {(c["agent"], c["destination"], c["tool"]): c for c in data["changes"]}
    assert rows[("coder", "api", "")]["now"] == "refused: egress_denied"
    assert rows[("coder", "api", "")]["examples"][0]["path"] == "/v1/users"
    assert rows[("coder", "api", "")]["examples"][0]["policy_version"] == "v1"
    assert rows[("coder", "mcp", "search")]["now"] == "refused: tool_denied"
    assert "rate limits" in data["not_replayed"]

    current = write(tmp_path / "current", CURRENT)
    result = runner.invoke(app, ["plan", "--replay", str(current), "--store", db])
    assert result.exit_code == 0, result.output
    assert "No recorded request changes its decision." in result.stdout
    assert "not replayed: path guard" in result.stdout

    result = runner.invoke(app, ["plan", "--replay", str(current), "--against", str(current)])
    assert result.exit_code == 1 and "--against does not apply" in result.output
    result = runner.invoke(app, ["plan", "--replay", str(current), "--store", db, "--since", "x"])
    assert result.exit_code == 1 and "--since" in result.output
    result = runner.invoke(app, ["plan", "--replay", str(current), "--store", db + ".missing"])
    assert result.exit_code == 1 and "no audit log" in result.output
    result = runner.invoke(app, ["plan", "--replay", str(current), "--store", db, "--since", "1m"])
    assert result.exit_code == 0 and "on 0 recorded requests" in result.stdout


def test_candidate_from_a_git_ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    write(repo / "policies", CURRENT)

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "current")
    git("checkout", "-qb", "change")
    (repo / "policies" / "agents.yaml").write_text(CANDIDATE)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "narrow")
    store = SqliteAuditStore(tmp_path / "audit.db")
    store.append(traffic())
    store.close()
    monkeypatch.chdir(repo)
    db = str(tmp_path / "audit.db")
    for ref, code in (("main:policies", 0), ("change:policies", 2)):
        result = runner.invoke(
            app,
            ["plan", "--replay", ref, "--store", db, "--state-dir", str(tmp_path / "s")],
        )
        assert result.exit_code == code, (ref, result.output)
    result = runner.invoke(app, ["plan", "--replay", "nosuchref:policies", "--store", db])
    assert result.exit_code == 1
    assert "unknown ref" in result.output

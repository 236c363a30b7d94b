"""`meshgate audit ...` against a real SQLite store: output formats, exit codes, one-line errors."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from audit_fixtures import make_records
from typer.testing import CliRunner

from meshgate.audit.chain import to_micros
from meshgate.audit.http import add_audit_routes
from meshgate.audit.record import AuditRecord
from meshgate.audit.sqlite_store import SqliteAuditStore
from meshgate.cli.audit import audit_app, follow
from meshgate.controlplane.admin import token_middleware
from meshgate.identity.admin_token import generate_token

runner = CliRunner()


@pytest.fixture
def now() -> dt.datetime:
    """Taken per test, so relative filters (`--since 10m`) hold however late the test runs."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, now: dt.datetime) -> Path:
    """A state dir whose audit.db holds 30 records from the last 30 minutes (one a minute)."""
    monkeypatch.delenv("MESHGATE_AUDIT_STORE", raising=False)
    store = SqliteAuditStore(tmp_path / "audit.db")
    records = make_records(30)
    shifted = [
        AuditRecord(**{**r.__dict__, "timestamp": now - dt.timedelta(minutes=30 - i)})
        for i, r in enumerate(records)
    ]
    store.append(shifted[:15])
    store.append(shifted[15:])
    store.close()
    return tmp_path


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(audit_app, list(args), env={"MESHGATE_ADMIN_TOKEN": "", **(env or {})})
    return result.exit_code, result.stdout, result.stderr


def test_query_json_lines_with_filters(state: Path) -> None:
    code, out, _ = run(
        "query",
        "--state-dir",
        str(state),
        "--agent",
        "a1",
        "--decision",
        "denied",
        "--format",
        "json",
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and rows
    assert {(r["agent"], r["decision"]) for r in rows} == {("a1", "denied")}
    stamps = [r["timestamp"] for r in rows]
    assert stamps == sorted(stamps, reverse=True)


def test_query_since_and_limit_with_cursor_on_stderr(state: Path) -> None:
    code, out, err = run(
        "query", "--state-dir", str(state), "--since", "10m", "--limit", "4", "--format", "csv"
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 4
    assert rows[0]["request_id"] == "req-000029"
    assert err.startswith("more: --cursor ")
    cursor = err.split()[-1]
    code, out, err = run(
        "query",
        "--state-dir",
        str(state),
        "--since",
        "10m",
        "--limit",
        "100",
        "--cursor",
        cursor,
        "--format",
        "json",
    )
    ids = [json.loads(line)["request_id"] for line in out.splitlines()]
    assert ids == [f"req-{i:06d}" for i in range(25, 20, -1)] and err == ""


def test_query_table(state: Path) -> None:
    code, out, _ = run("query", "--state-dir", str(state), "--limit", "3")
    assert code == 0 and "decision" in out and "a2" in out and "denied" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["query", "--since", "yesterdayish"], "--since: 'yesterdayish' is neither a duration"),
        (["query", "--decision", "maybe"], "--decision: 'maybe' is not one of"),
        (["query", "--format", "xml"], "--format must be one of table, json, csv"),
        (["query", "--cursor", "!!"], "--cursor: '!!' is not a cursor"),
        (["summary", "--since", "soon"], "--since: 'soon' is neither"),
        (["retain"], "give exactly one of --retain DURATION or --older-than TIME"),
        (["retain", "--retain", "a month"], "--retain: 'a month' is not a duration"),
        (["tail", "--format", "table"], "--format must be one of text, json"),
    ],
)
def test_bad_input_is_one_line_naming_the_option(
    state: Path, args: list[str], message: str
) -> None:
    code, out, err = run(*args, "--state-dir", str(state))
    assert code == 1 and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_missing_store_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHGATE_AUDIT_STORE", raising=False)
    code, _, err = run("query", "--state-dir", str(tmp_path / "nope"))
    assert code == 1 and "no audit log at" in err and "--store" in err
    assert not (tmp_path / "nope").exists()  # reading never creates a store
    code, _, err = run("verify", "--store", "postgresql://nobody@127.0.0.1:1/x")
    assert code == 1 and err.startswith("error: cannot connect to the audit store")
    assert "Traceback" not in err


def test_store_from_env_and_sqlite_url(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHGATE_AUDIT_STORE", f"sqlite://{state / 'audit.db'}")
    code, out, _ = run("verify", "--state-dir", "/nonexistent")
    assert code == 0 and out.startswith("audit log intact: 30 records in 2 batches")


def test_summary(state: Path) -> None:
    code, out, _ = run("summary", "--state-dir", str(state), "--since", "24h", "--format", "json")
    rows = json.loads(out)
    assert code == 0 and sum(r["count"] for r in rows) == 30
    assert {"agent": "a0", "destination": "d0", "decision": "allowed", "count": 3} in rows
    code, out, _ = run("summary", "--state-dir", str(state), "--since", "330s")  # ages 1..5 min
    assert code == 0 and re.search(r"total\s*│.*│\s*5\s*│", out), out


def test_verify_reports_tampering_and_exits_1(state: Path) -> None:
    assert run("verify", "--state-dir", str(state))[0] == 0
    conn = sqlite3.connect(state / "audit.db")
    with conn:
        conn.execute("UPDATE audit_records SET decision = 'allowed' WHERE id = 18")
    conn.close()
    code, out, err = run("verify", "--state-dir", str(state))
    assert code == 1 and out == ""
    assert "record id 18 (request_id 'req-000017') in batch 2 was edited" in err
    code, out, _ = run("verify", "--state-dir", str(state), "--format", "json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert report["problems"][0] == {
        "kind": "edited",
        "message": report["problems"][0]["message"],
        "seq": 2,
        "record_id": 18,
        "request_id": "req-000017",
    }


def test_retain_then_verify(state: Path, now: dt.datetime) -> None:
    older = (now - dt.timedelta(minutes=15, seconds=30)).isoformat()
    code, out, _ = run("retain", "--state-dir", str(state), "--older-than", older)
    assert code == 0 and out.startswith("removed 15 records in 1 batches")
    code, out, _ = run("verify", "--state-dir", str(state))
    assert code == 0 and "15 records in 1 batches, retained from batch 2" in out
    code, out, _ = run("retain", "--state-dir", str(state), "--retain", "1h")
    assert code == 0 and out.startswith("removed 0 records")


def test_tail_prints_the_last_lines_oldest_first(state: Path) -> None:
    code, out, _ = run("tail", "--state-dir", str(state), "-n", "3")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    assert " a0 -> d1 GET d1.example/v1/items/27" in lines[0] and "allowed" not in lines[0]
    assert lines[2].endswith("403 denied (not_allowlisted)")
    code, out, _ = run("tail", "--state-dir", str(state), "-n", "2", "--format", "json")
    assert [json.loads(x)["request_id"] for x in out.splitlines()] == ["req-000028", "req-000029"]


def test_follow_prints_records_appended_later(state: Path, now: dt.datetime) -> None:
    store = SqliteAuditStore(state / "audit.db")
    seen: list[str] = []
    polls = iter(range(4))

    def keep_going() -> bool:
        n = next(polls, None)
        if n == 1:  # another writer appends between polls
            store.append(make_records(3, start=100))
        return n is not None

    last = follow(store, store.last_id(), lambda r: seen.append(r.request_id), 0.01, keep_going)
    assert seen == ["req-000100", "req-000101", "req-000102"] and last == 33
    assert to_micros(now) > 0
    store.close()


ADMIN_TOKEN = generate_token()


@pytest.fixture
def control_plane(state: Path) -> Iterator[str]:
    """The admin API's audit routes over the state's store, served from a background thread,
    behind the operator token ADMIN_TOKEN as the control plane serves them."""
    store = SqliteAuditStore(state / "audit.db")
    app = web.Application(middlewares=[token_middleware(ADMIN_TOKEN)])
    add_audit_routes(app, lambda: store)
    loop = asyncio.new_event_loop()
    runner_ = web.AppRunner(app)
    loop.run_until_complete(runner_.setup())
    site = web.TCPSite(runner_, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.run_until_complete(runner_.cleanup())
    loop.close()
    store.close()


def test_query_and_summary_through_the_control_plane(control_plane: str, tmp_path: Path) -> None:
    elsewhere = str(tmp_path / "no-store-here")
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    args = ["--control-plane", control_plane, "--state-dir", elsewhere]
    args += ["--admin-token-file", str(token_file)]
    code, out, err = run("query", *args, "--agent", "a2", "--limit", "3", "--format", "json")
    assert code == 0, err
    assert [json.loads(x)["request_id"] for x in out.splitlines()] == [
        "req-000029",
        "req-000026",
        "req-000023",
    ]
    assert err.startswith("more: --cursor ")
    code, out, _ = run("summary", *args, "--since", "24h", "--format", "json")
    assert code == 0 and sum(r["count"] for r in json.loads(out)) == 30
    # the token from the environment, or from the control plane's state dir
    code, out, err = run(
        "summary", "--control-plane", control_plane, "--state-dir", elsewhere,
        env={"MESHGATE_ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    assert code == 0, err
    (tmp_path / "cp-state" / "admin").mkdir(parents=True)
    (tmp_path / "cp-state" / "admin" / "token").write_text(ADMIN_TOKEN)
    code, out, err = run(
        "query", "--control-plane", control_plane, "--state-dir", str(tmp_path / "cp-state"),
        "--format", "json",
    )  # fmt: skip
    assert code == 0 and "req-000029" in out, err


def test_control_plane_without_or_with_a_wrong_token(control_plane: str, tmp_path: Path) -> None:
    args = ["--control-plane", control_plane, "--state-dir", str(tmp_path / "none")]
    for command in ("query", "summary"):
        code, out, err = run(command, *args)
        assert code == 1 and out == "" and err.count("\n") == 1, err
        assert "needs its admin token and none was found" in err
        assert "--admin-token-file" in err
        code, out, err = run(command, *args, env={"MESHGATE_ADMIN_TOKEN": "w" * 43})
        assert code == 1 and out == "" and err.count("\n") == 1, err
        assert "refused the admin token from $MESHGATE_ADMIN_TOKEN (401)" in err
        assert "w" * 43 not in err and ADMIN_TOKEN not in err


def test_control_plane_errors_are_one_line(control_plane: str) -> None:
    code, _, err = run("query", "--control-plane", "http://127.0.0.1:1")
    assert code == 1 and err.startswith("error: cannot reach the control plane at")
    assert err.count("\n") == 1

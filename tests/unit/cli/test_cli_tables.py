"""Tables that fit (issue 21): `audit query`, `audit summary`, `status` and `budget status` at
80 columns, at 200, in a pipe without $COLUMNS, and with --wide.

At any width the key columns hold every value whole (folded onto more lines, never cut to "…")
and no line is wider than the width; --wide adds the other columns, unwrapped.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from table_reader import assert_fits, column_text, headers, squeezed
from typer.testing import CliRunner

from meshgate.adminclient import Answer
from meshgate.audit.record import DECISIONS, AuditRecord
from meshgate.audit.sqlite_store import SqliteAuditStore
from meshgate.cli import admin, app
from meshgate.cli.output import short_times

runner = CliRunner()

LONG_AGENT = "research-assistant-for-the-quarterly-finance-report"
LONG_DESTINATION = "openai-chat-completions-eu-west-1-primary"
LONG_REASON = (
    "path /v1/files/upload/very/long/segment/that/goes/on is not allowed for agent "
    f"{LONG_AGENT} on {LONG_DESTINATION}"
)
WIDTHS = [(80, {"COLUMNS": "80"}), (200, {"COLUMNS": "200"}), (80, {"COLUMNS": None})]
WIDTH_IDS = ["80", "200", "pipe"]


def invoke(args: list[str], env: dict[str, str | None]) -> str:
    result = runner.invoke(app, args, env={"MESHGATE_ADMIN_TOKEN": "", **env})
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def record(i: int, now: dt.datetime, **overrides: Any) -> AuditRecord:
    agent = [LONG_AGENT, "coder", "a"][i % 3]
    fields: dict[str, Any] = {
        "timestamp": now - dt.timedelta(seconds=i),
        "request_id": f"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0-{i:04d}",
        "agent": agent,
        "spiffe_id": f"spiffe://mesh.example.internal/ns/agents/sa/{agent}",
        "destination": [LONG_DESTINATION, "github"][i % 2],
        "host": "api.example.com",
        "method": "POST",
        "path": f"/v1/chat/completions/{i}",
        "status": 200 if i % 4 == 0 else 403,
        "decision": DECISIONS[i % 4],
        "reason": ["", LONG_REASON, "rate limit 10/min", "upstream reset"][i % 4],
        "bytes_sent": 1234 * i,
        "bytes_received": 99,
        "duration_ms": 12.5,
        "policy_version": "3f2a9c1b7d4e",
        "gateway": "gateway/main",
        "mcp_method": "tools/call" if i == 3 else "",
        "mcp_tool": "read_file" if i == 3 else "",
    }
    fields.update(overrides)
    return AuditRecord(**fields)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """An audit store with 8 records from the last few seconds; the args that open it."""
    monkeypatch.delenv("MESHGATE_AUDIT_STORE", raising=False)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    s = SqliteAuditStore(tmp_path / "audit.db")
    s.append([record(i, now) for i in range(8)])
    s.close()
    return ["--store", str(tmp_path / "audit.db")]


def query_json(store: list[str]) -> list[dict[str, Any]]:
    out = invoke(["audit", "query", *store, "-o", "json"], {})
    return [json.loads(line) for line in out.splitlines()]


KEY = {"agent": "agent", "destination": "destination", "decision": "decision", "reason": "reason"}


@pytest.mark.parametrize(("width", "env"), WIDTHS, ids=WIDTH_IDS)
def test_audit_query_keeps_key_columns_whole(
    store: list[str], width: int, env: dict[str, str | None]
) -> None:
    records = query_json(store)
    out = invoke(["audit", "query", *store], env)
    assert_fits(out, width)
    for header, field in KEY.items():
        assert column_text(out, header) == squeezed([r[field] for r in records]), header
    times = column_text(out, "time (UTC)")
    assert times == squeezed([r["timestamp"][11:19] for r in records])  # all today: HH:MM:SS
    shown = headers(out)
    assert "spiffe id" not in shown and "request id" not in shown
    if width == 200:  # room for the status code
        assert "status" in shown
        assert column_text(out, "status") == squeezed([str(r["status"]) for r in records])


def test_audit_query_wide_adds_every_column_unwrapped(store: list[str]) -> None:
    records = query_json(store)
    out = invoke(["audit", "query", *store, "--wide"], {"COLUMNS": "80"})
    assert headers(out) == [
        "time (UTC)", "agent", "spiffe id", "destination", "request", "status", "decision",
        "reason", "sent", "received", "ms", "policy", "gateway", "request id",
    ]  # fmt: skip
    body = [line for line in out.splitlines() if line.startswith("│")]
    assert len(body) == len(records)  # one line per record: nothing wrapped
    for line, r in zip(body, records, strict=True):
        for value in (r["spiffe_id"], r["request_id"], r["reason"], r["agent"]):
            assert value in line
    assert "POST api.example.com/v1/chat/completions/3 [tools/call read_file]" in out
    assert "…" not in out


def test_audit_query_csv_and_json_ignore_the_width(store: list[str]) -> None:
    records = query_json(store)
    assert [r["reason"] for r in records][1] == LONG_REASON
    out = invoke(["audit", "query", *store, "--format", "csv"], {"COLUMNS": "40"})
    assert LONG_REASON in out and out.count("\n") == len(records) + 1


def test_old_records_show_their_date(tmp_path: Path) -> None:
    now = dt.datetime(2026, 12, 1, 9, 30, 5, tzinfo=dt.UTC)
    today = [now - dt.timedelta(hours=1), now]
    assert short_times(today, now) == ["08:30:05", "09:30:05"]
    older = [now - dt.timedelta(days=1), now]
    assert short_times(older, now) == ["2026-11-30 09:30:05", "2026-12-01 09:30:05"]


@pytest.mark.parametrize(("width", "env"), WIDTHS, ids=WIDTH_IDS)
def test_audit_summary_keeps_names_whole(
    store: list[str], width: int, env: dict[str, str | None]
) -> None:
    rows = json.loads(invoke(["audit", "summary", *store, "-o", "json"], {}))
    out = invoke(["audit", "summary", *store], env)
    assert_fits(out, width)
    for field, total in (("agent", "total"), ("destination", ""), ("decision", "")):
        assert column_text(out, field) == squeezed([r[field] for r in rows]) + total, field
    assert column_text(out, "requests") == squeezed([str(r["count"]) for r in rows]) + "8"


# --- status and budget status, from a canned admin API answer


def node(name: str, identity: str, versions: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "node": name,
        "kind": "sidecar",
        "group": "default",
        "identity": identity,
        "protocol": "delta",
        "peer": "ipv4:127.0.0.1:50000",
        "envoy": "1.40.0/Clean/RELEASE/BoringSSL",
        "connected_at": "2026-12-01T09:00:00Z",
        "types": {
            t: {"sent": v, "acked": v, "policy": None, "pending_ack": False}
            for t, v in versions.items()
        },
        "last_nack": None,
        **extra,
    }


SIDECAR = f"sidecar/{LONG_AGENT}/7f3a9c2e-pod-0"
NACK_MESSAGE = (
    "Error adding/updating listener(s) egress_http: the route configuration name "
    "'allow/research-assistant' is not valid because it is far too long for envoy to accept"
)
ALL_SAME = dict.fromkeys(("cds", "eds", "lds", "rds", "sds"), "9b8c7d6e5f4a3b2c1d0e")
STATUS = {
    "policy": {
        "version": "3f2a9c1b7d4e",
        "source": "dir:/srv/meshgate/policies/a/rather/long/path/to/the/policy/checkout",
        "agents": 3,
        "destinations": 4,
        "missing_secrets": [],
        "last_rejection": None,
    },
    "ca": None,
    "consul": [],
    "nodes": [
        node("gateway/main", "spiffe://mesh.example.internal/gateway/main", ALL_SAME),
        node(
            SIDECAR,
            f"spiffe://mesh.example.internal/ns/agents/sa/{LONG_AGENT}",
            {**ALL_SAME, "lds": "0a1b2c3d4e5f6a7b"},
            last_nack={
                "node": SIDECAR,
                "type": "lds",
                "version": "0a1b2c3d4e5f6a7b",
                "message": NACK_MESSAGE,
                "at": "2026-12-01T09:10:00Z",
            },
        ),
    ],
}


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The admin API as a dict of path -> body; nothing is dialled."""
    bodies: dict[str, Any] = {"/status": STATUS}
    monkeypatch.setattr(admin, "connect", lambda *a, **k: object())
    monkeypatch.setattr(admin, "call", lambda _c, _m, path, *a, **k: Answer(200, bodies[path]))
    return bodies


@pytest.mark.parametrize(("width", "env"), WIDTHS, ids=WIDTH_IDS)
def test_status_keeps_node_versions_and_nacks_readable(
    answers: dict[str, Any], width: int, env: dict[str, str | None]
) -> None:
    out = invoke(["status"], env)
    assert_fits(out, width)
    assert column_text(out, "node") == squeezed(["gateway/main", SIDECAR])
    assert column_text(out, "ACKed") == squeezed(
        [
            "cds,eds,lds,rds,sds: 9b8c7d6e5f4a",
            "cds,eds,rds,sds: 9b8c7d6e5f4a",
            "lds: 0a1b2c3d4e5f",
        ]
    )
    assert column_text(out, "NACK") == "lds"
    assert "".join(STATUS["policy"]["source"].split()) in "".join(out.split())
    nack = f"NACK {SIDECAR} lds 0a1b2c3d4e5f6a7b at 2026-12-01T09:10:00Z: {NACK_MESSAGE}"
    assert "".join(nack.split()) in "".join(out.split())
    assert "cds" not in headers(out)  # per-type columns only with --wide
    if width == 200:  # room for the identity too
        assert column_text(out, "identity") == squeezed([n["identity"] for n in STATUS["nodes"]])
    else:
        assert "identity" not in headers(out)


def test_status_wide_has_identity_envoy_and_a_column_per_type(answers: dict[str, Any]) -> None:
    out = invoke(["status", "--wide"], {"COLUMNS": "80"})
    assert headers(out) == [
        "node", "identity", "proto", "envoy", "cds", "eds", "lds", "rds", "sds", "NACK",
    ]  # fmt: skip
    sidecar = next(line for line in out.splitlines() if SIDECAR in line)
    assert f"spiffe://mesh.example.internal/ns/agents/sa/{LONG_AGENT}" in sidecar
    assert "1.40.0/Clean/RELEASE/BoringSSL" in sidecar
    assert sidecar.count("9b8c7d6e5f4a") == 4 and "0a1b2c3d4e5f" in sidecar
    assert "ACKed" not in headers(out)


CONSUL = [
    {
        "service": "inference-gateway-eu-west-1-primary-cluster",
        "tag": "[canary]",
        "destinations": ["openai-compatible-eu", "openai-compatible-us"],
        "instances": 3,
        "index": "123456",
        "last_success_at": "2026-12-01T09:00:00Z",
        "last_error": None,
        "last_error_at": None,
    }
]


@pytest.mark.parametrize(("width", "env"), WIDTHS, ids=WIDTH_IDS)
def test_status_consul_ca_and_a_refused_change_fit_too(
    answers: dict[str, Any], width: int, env: dict[str, str | None]
) -> None:
    refused = {"origin": "watch", "at": "2026-12-01T09:05:00Z", "problems": ["[bold]x[/bold]"]}
    answers["/status"] = {
        **STATUS,
        "policy": {
            **STATUS["policy"],
            "missing_secrets": ["OPENAI_KEY"],
            "last_rejection": refused,
        },
        "ca": {"source": "vault", "intermediate_serial": "7f", "intermediate_not_after": "2027"},
        "consul": CONSUL,
    }
    out = invoke(["status"], env)
    assert_fits(out, width)
    assert column_text(out, "consul service") == CONSUL[0]["service"]
    assert column_text(out, "destinations") == "openai-compatible-eu,openai-compatible-us"
    assert column_text(out, "instances") == "3"
    assert "  [bold]x[/bold]" in out  # shown as written, not read as markup
    assert "missing secrets (their destinations answer 503): OPENAI_KEY" in out
    assert ("tag" in headers(out)) is (width == 200)  # the consul table comes first
    wide = invoke(["status", "--wide"], env)
    assert "[canary]" in wide and "123456" in wide


def test_status_json_is_the_whole_answer(answers: dict[str, Any]) -> None:
    assert json.loads(invoke(["status", "-o", "json"], {"COLUMNS": "40"})) == STATUS


BUDGETS = {
    "now": 1_764_576_000,
    "budgets": [
        {
            "budget": f"rule/{LONG_AGENT}/0/monthly-openai-spend",
            "scope": f"rule 0 of {LONG_AGENT} ({LONG_DESTINATION})",
            "agents": [LONG_AGENT],
            "unit": "cost_micro_usd",
            "window": "30d",
            "limit": 250_000_000,
            "spent": 12_345_678,
            "reserved": 1_000_000,
            "remaining": 236_654_322,
            "resets_at": 1_764_576_000 + 86_400 * 3,
            "on_store_failure": "deny",
        },
        {
            "budget": "agent/coder/tokens",
            "scope": "agent coder",
            "agents": ["coder"],
            "unit": "tokens",
            "window": "1h",
            "limit": 1_000_000,
            "spent": 999_999,
            "reserved": 0,
            "remaining": 1,
            "resets_at": 1_764_576_000 + 1800,
            "on_store_failure": "allow",
        },
    ],
}


@pytest.mark.parametrize(("width", "env"), WIDTHS, ids=WIDTH_IDS)
def test_budget_status_fits(
    answers: dict[str, Any], width: int, env: dict[str, str | None]
) -> None:
    answers["/v1/budgets"] = BUDGETS
    out = invoke(["budget", "status"], env)
    assert_fits(out, width)
    assert column_text(out, "budget") == squeezed([b["budget"] for b in BUDGETS["budgets"]])
    assert column_text(out, "spent") == "$12.345678999,999"
    assert column_text(out, "limit") == "$250.00USD1,000,000tokens"
    assert column_text(out, "left") == "94%0%"
    assert column_text(out, "resets") == "in3d0hin30m"
    assert "scope" not in headers(out)
    wide = invoke(["budget", "status", "--wide"], env)
    assert {"scope", "agents", "reserved", "window", "on store failure"} <= set(headers(wide))
    assert f"rule 0 of {LONG_AGENT} ({LONG_DESTINATION})" in wide

"""Issue 21 item 3: `meshgate demo` as a new user runs it. The demo command (a subprocess, ports
from the OS) prints what to run next; the printed lines run the demo agents (the official
`openai` and `mcp` SDKs with their default `https://` URLs and no key) behind real sidecars and
a real gateway, and show the five outcomes: an allowed streamed call with the key injected, a
denied path, a refused MCP tool with its reason, a rate limit, and the audit log listing them.
curl and httpx go the same way."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from builders import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

OTHER_CLIENTS = """\
import json, subprocess
import httpx
say = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
out = {}
with httpx.Client() as c:  # HTTPS_PROXY and SSL_CERT_FILE from the environment, as always
    out["httpx"] = c.get("https://api.openai.com/v1/files").status_code
done = subprocess.run(
    ["curl", "-sS", "-H", "content-type: application/json", "-d", json.dumps(say),
     "https://api.openai.com/v1/chat/completions"], capture_output=True, text=True)
out["curl"] = [done.stderr, json.loads(done.stdout or "{}").get("choices", [{}])[0]]
print(json.dumps(out))
"""


async def run(argv: list[str], timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**{k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}, "COLUMNS": "80"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def as_agent(line: str) -> list[str]:
    """A printed `sidecar run` line, run here with --insecure-same-user: CI keeps the test venv
    where `nobody` cannot read it (under /root). Dropping CMD to `nobody` with these same SDKs
    and CA is test_https_intercept's hostile-agent test; here it is what the demo shows."""
    argv = shlex.split(line.removeprefix("sudo "))
    cut = argv.index("--")
    return [*argv[:cut], "--insecure-same-user", *argv[cut:]]


async def audit(query: list[str], wanted: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        code, out, err = await run([*query, "-o", "json"])
        assert code == 0, err
        records = [json.loads(line) for line in out.splitlines()]
        if len(records) >= wanted or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.3)


async def test_demo_shows_allowed_denied_refused_limited_and_audited(tmp_path: Path) -> None:
    state = tmp_path / "state"
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshgate.cli", "demo", "--state-dir", str(state),
        "--xds-port", "0", "--admin-port", "0", "--gateway-port", str(free_port()),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert demo.stdout is not None
    shown: list[str] = []
    try:
        while not shown or shown[-1] != "Press Ctrl-C to stop.":
            line = await asyncio.wait_for(demo.stdout.readline(), 60)
            assert line, "the demo exited: " + (await demo.stderr.read()).decode()  # type: ignore[union-attr]
            shown.append(line.decode().rstrip("\n"))
        text = "\n".join(shown)
        # nothing weakened: xDS over TLS, stand-ins on loopback, no --insecure anywhere
        assert "(TLS)" in text and "--insecure" not in text
        assert "https://api.openai.com -> 127.0.0.1:" in text
        assert "https://mcp.demo.example/mcp -> 127.0.0.1:" in text
        key_file = state / "demo" / "policies" / "secrets" / "openai-api-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text()
        runs = [s.strip() for s in shown if " sidecar run " in s]
        assert [shlex.split(r)[shlex.split(r).index("--agent") + 1] for r in runs] == [
            "researcher",
            "coder",
        ]
        assert runs[0].endswith("demo/agent_openai.py") and runs[1].endswith("demo/agent_mcp.py")
        (query_line,) = [s.strip() for s in shown if " audit query" in s]

        code, openai_out, err = await run(as_agent(runs[0]))
        assert code == 0, err
        code, mcp_out, err = await run(as_agent(runs[1]))
        assert code == 0, err
        script = tmp_path / "clients.py"
        script.write_text(OTHER_CLIENTS)
        argv = as_agent(runs[0])
        code, other_out, err = await run([*argv[: argv.index("--") + 1], argv[-2], str(script)])
        assert code == 0, err
        assert key not in openai_out + mcp_out + other_out

        # 1. allowed and streamed; the provider only answers its key, which the agent never had
        assert "allowed: 200, streamed 'ok ok ok ok ok ok ok ok'" in openai_out
        # 2. a denied path, with the gateway's reason
        assert "denied: 403 egress_denied: no rule of this agent allows" in openai_out
        # 3. a rate limit after the rule's two calls a minute, with retry-after
        assert "call 1: allowed: 200, 3 models" in openai_out
        assert "call 2: allowed: 200, 3 models" in openai_out
        assert "call 3: rate limited: 429 rate_limited" in openai_out
        assert "retry-after 60s" in openai_out
        # 4. MCP: the list is filtered, one tool runs, the others are refused with reasons
        assert "tools/list shows only what coder may call: ['search_docs', 'open_issue']" in (
            mcp_out
        )
        assert "2. search_docs: allowed: rateLimit:" in mcp_out
        assert "3. open_issue in acme/prod: refused:" in mcp_out
        assert 'tool "open_issue": argument "repo"' in mcp_out
        assert "4. delete_repo: refused:" in mcp_out
        assert 'tool "delete_repo" is not allowed for agent coder on docs-mcp' in mcp_out
        # curl and httpx, https:// through the same sidecar
        other = json.loads(other_out.strip().splitlines()[-1])
        assert other["httpx"] == 403
        assert other["curl"][0] == "" and other["curl"][1]["message"]["content"] == "ok ok"

        # 5. the audit log has every one of them, as the printed command shows it
        records = await audit(shlex.split(query_line), 16)
        seen = {
            (r["agent"], r["method"], r["path"], r["mcp_tool"], r["decision"], r["reason"])
            for r in records
        }
        for wanted in [
            ("researcher", "POST", "/v1/chat/completions", "", "allowed", ""),
            ("researcher", "GET", "/v1/files", "", "denied", "egress_denied"),
            ("researcher", "GET", "/v1/models", "", "allowed", ""),
            ("researcher", "GET", "/v1/models", "", "rate_limited", "rate_limited"),
            ("coder", "POST", "/mcp", "search_docs", "allowed", ""),
            ("coder", "POST", "/mcp", "open_issue", "denied", "argument_refused"),
            ("coder", "POST", "/mcp", "delete_repo", "denied", "tool_denied"),
        ]:
            assert wanted in seen, (wanted, seen)
        streamed = [r for r in records if r["path"] == "/v1/chat/completions"]
        assert any(r["model"] == "gpt-4o-mini" and r["tokens_out"] == 8 for r in streamed), [
            {k: r[k] for k in ("decision", "reason", "status", "model", "tokens_in", "tokens_out")}
            for r in streamed
        ]
        assert all(r["gateway"] == "gateway/local" for r in records)
        assert {r["spiffe_id"] for r in records} == {
            "spiffe://agents.local/agent/researcher",
            "spiffe://agents.local/agent/coder",
        }
        code, table, err = await run(shlex.split(query_line))
        assert code == 0, err
        assert all(len(line) <= 80 for line in table.splitlines())
        for word in ("allowed", "egress_denied", "rate_limited", "tool_denied"):
            assert word in table
    finally:
        if demo.returncode is None:
            demo.send_signal(signal.SIGINT)
        rest, err_bytes = await asyncio.wait_for(demo.communicate(), 30)
    log = rest.decode()
    assert demo.returncode == 0, err_bytes.decode()
    assert log.rstrip().endswith("meshgate demo stopped.")
    # the other side: the provider got the gateway's key; the refused tools never arrived
    assert "POST /v1/chat/completions -> 200; key: the demo key (injected by the gateway)" in log
    assert "search_docs(query='rate limits')" in log
    assert "delete_repo" not in log and "open_issue" not in log
    assert "-> 401" not in log

"""The audit trail as a user runs it: `meshgate serve`, `gateway`, `audit query`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from builders import free_port
from harness import write_policy

pytestmark = pytest.mark.e2e

MESHGATE = [sys.executable, "-m", "meshgate.cli"]
ENV = {**os.environ, "COLUMNS": "200"}


def spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*MESHGATE, *args], stdout=out, stderr=out, env=ENV, start_new_session=True
        )


def eventually(check: object, timeout: float = 30, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()  # type: ignore[operator]
        except (httpx.HTTPError, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_gateway_ships_and_audit_query_shows_it(tmp_path: Path) -> None:
    listen, xds, admin = free_port(), free_port(), free_port()
    state = tmp_path / "state"
    write_policy(
        tmp_path / "policies",
        listen,
        {"tools": free_port(), "other": free_port()},
        agents={"researcher": ["other"]},
    )
    serve = spawn(
        "serve", "--policies", str(tmp_path / "policies"), "--state-dir", str(state),
        "--xds-port", str(xds), "--admin-port", str(admin), "--gateway-bind", "127.0.0.1",
        "--insecure",  # the test speaks to the gateway directly, without a client certificate
        log=tmp_path / "serve.log",
    )  # fmt: skip
    gateway = None
    try:
        eventually(
            lambda: httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200,
            what="control plane ready",
        )
        gateway = spawn(
            "gateway", "--control-plane", f"127.0.0.1:{xds}",
            "--state-dir", str(state), "--name", "local", "--insecure",
            log=tmp_path / "gateway.log",
        )  # fmt: skip

        def refused() -> httpx.Response | None:
            r = httpx.get(
                f"http://127.0.0.1:{listen}/x",
                headers={"Host": "tools.internal", "x-meshgate-agent": "researcher"},
            )
            return r if r.status_code == 403 else None

        response = eventually(refused, what="the gateway refusing")
        assert isinstance(response, httpx.Response)
        request_id = response.headers["x-request-id"]

        def listed() -> list[dict[str, object]] | None:
            out = subprocess.run(
                [*MESHGATE, "audit", "query", "--state-dir", str(state), "--format", "json"],
                capture_output=True,
                text=True,
                env=ENV,
                timeout=30,
            )
            records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
            return records if any(r["request_id"] == request_id for r in records) else None

        records = eventually(listed, what="the record in `meshgate audit query`")
        assert isinstance(records, list)
        [record] = [r for r in records if r["request_id"] == request_id]
        assert record["gateway"] == "gateway/local"
        assert (record["decision"], record["reason"]) == ("denied", "egress_denied")
        assert record["agent"] == "researcher" and record["destination"] == "tools"
        workdir = state / "gateway-local"
        assert (workdir / "audit-spool.jsonl").stat().st_size > 0
        assert json.loads((workdir / "audit-spool.jsonl.checkpoint").read_text())["offset"] > 0

        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(20) == 0
    finally:
        for proc in (gateway, serve):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

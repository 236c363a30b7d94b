"""The whole local story as a user runs it: `meshgate up`, an ordinary agent script behind
`meshgate sidecar run`, and the audit log answering what it did and what it was refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from builders import free_port
from envoys import wait_live_admin
from harness import upstream, write_policy

pytestmark = pytest.mark.e2e

MESHGATE = [sys.executable, "-m", "meshgate.cli"]

AGENT = """\
import json
import urllib.error
import urllib.request  # an ordinary client: it only knows HTTP(S)_PROXY from its environment

out = {}
for url in ("http://search.internal/q?term=envoy", "http://billing.internal/invoices"):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            out[url] = [r.status, json.load(r)]
    except urllib.error.HTTPError as e:
        out[url] = [e.code, json.load(e)]
print(json.dumps(out))
"""


async def meshgate(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *MESHGATE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def wait_ready(url: str, timeout: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            try:
                resp = await client.get(url)
                if resp.status_code == 200:
                    return resp
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} not ready in {timeout}s")
            await asyncio.sleep(0.1)


async def test_up_agent_script_and_its_audit_trail(tmp_path: Path, agent_dir: Path) -> None:
    listen, xds, admin = (free_port() for _ in range(3))
    state = tmp_path / "state"
    async with upstream("search") as search, upstream("billing") as billing:
        write_policy(
            tmp_path / "policies",
            listen,
            {"search": search.port, "billing": billing.port},
            agents={"researcher": ["search"], "accountant": ["billing"]},
        )
        up = await asyncio.create_subprocess_exec(
            *MESHGATE,
            "up",
            "--policies",
            str(tmp_path / "policies"),
            "--state-dir",
            str(state),
            "--xds-port",
            str(xds),
            "--admin-port",
            str(admin),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            version = (await wait_ready(f"http://127.0.0.1:{admin}/readyz")).json()["version"]
            await asyncio.to_thread(wait_live_admin, up.pid)
            script = agent_dir / "agent.py"  # run by `nobody`, as sidecar run drops CMD to it
            script.write_text(AGENT)
            script.chmod(0o644)
            code, out, err = await meshgate(
                "sidecar",
                "run",
                "--agent",
                "researcher",
                "--control-plane",
                f"127.0.0.1:{xds}",
                "--state-dir",
                str(state),
                "--",
                "/usr/bin/python3",
                str(script),
            )
            assert code == 0, err
            seen = json.loads(out.strip().splitlines()[-1])
            allowed = seen["http://search.internal/q?term=envoy"]
            refused = seen["http://billing.internal/invoices"]
            assert allowed[0] == 200 and allowed[1]["upstream"] == "search"
            assert refused[0] == 403 and refused[1]["error"] == "egress_denied"
            assert len(search.hits) == 1 and not billing.hits

            # both requests are in the audit log, under the agent's verified SPIFFE ID
            deadline = time.monotonic() + 15
            while True:
                code, out, err = await meshgate(
                    "audit", "query", "--state-dir", str(state), "--agent", "researcher",
                    "--format", "json",
                )  # fmt: skip
                assert code == 0, err
                records = [json.loads(line) for line in out.splitlines()]
                if len(records) >= 2 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            by_dest = {r["destination"]: r for r in records}
            assert set(by_dest) == {"search", "billing"}, records
            for record in records:
                assert record["spiffe_id"] == "spiffe://agents.test/agent/researcher"
                assert record["policy_version"] == version
                assert record["gateway"] == "gateway/local"
            assert by_dest["search"]["decision"] == "allowed"
            assert by_dest["search"]["status"] == 200
            assert by_dest["search"]["path"] == "/q"  # never the query: it can carry secrets
            assert by_dest["billing"]["decision"] == "denied"
            assert by_dest["billing"]["status"] == 403
            assert by_dest["billing"]["reason"] == "egress_denied"

            code, out, err = await meshgate("audit", "verify", "--state-dir", str(state))
            assert code == 0 and "intact" in out, out + err
        finally:
            up.send_signal(signal.SIGINT)
            _, up_err = await asyncio.wait_for(up.communicate(), 30)
    assert up.returncode == 0, up_err.decode()

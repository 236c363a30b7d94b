"""A hostile agent on the same host cannot use the control plane's admin API (issue 17, finding 7).

The agent reaches 127.0.0.1 like any local process: it goes straight to the admin port, not
through its sidecar, tries to roll the CA and to read every agent's audit records, status, policy
and identities, with no token, forged ones, and the token file it cannot read. All of it is 401.
The operator's own commands, run from the mesh's directory, keep working with the token the
control plane created in its state directory.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import Mesh

pytestmark = pytest.mark.e2e

ATTACK = """\
import http.client, json, os, urllib.request, urllib.error
HOST, PORT, TOKEN_FILE = {host!r}, {port}, {token_file!r}
out = {{"uid": os.getuid(), "requests": {{}}, "bodies": []}}

def call(method, path, headers):
    c = http.client.HTTPConnection(HOST, PORT, timeout=10)  # straight to it, not via HTTP_PROXY
    c.request(method, path, headers=headers)
    r = c.getresponse()
    body = r.read().decode(errors="replace")
    c.close()
    return r.status, r.getheader("WWW-Authenticate"), body

try:
    with open(TOKEN_FILE) as fh:
        fh.read()
    out["token_file"] = "read"
except OSError as exc:
    out["token_file"] = type(exc).__name__
out["env_token"] = "MESHGATE_ADMIN_TOKEN" in os.environ
forged = [{{}}, {{"Authorization": "Bearer " + "A" * 43}}, {{"Authorization": "Bearer"}},
          {{"Authorization": "Basic YWRtaW46YWRtaW4="}}, {{"X-Forwarded-For": "127.0.0.1"}}]
for method, path in [("POST", "/v1/ca/rotate"), ("GET", "/v1/audit"),
                     ("GET", "/v1/audit?agent=accountant&limit=1000"),
                     ("GET", "/v1/audit/summary?since=7d"), ("GET", "/status"),
                     ("GET", "/v1/policy"), ("GET", "/v1/identity/accountant")]:
    seen = []
    for headers in forged:
        status, challenge, body = call(method, path, headers)
        seen.append([status, challenge])
        out["bodies"].append(body)
    out["requests"][method + " " + path] = seen
out["healthz"] = call("GET", "/healthz", {{}})[0]
# an honest call through the sidecar, so the audit log has something of this agent's to hide
try:
    with urllib.request.urlopen("http://docs.internal/v1/search", timeout=10) as r:
        out["honest"] = r.status
except urllib.error.HTTPError as e:
    out["honest"] = e.code
print(json.dumps(out))
"""


def _status(mesh: Mesh) -> dict[str, object]:
    done = mesh.meshgate("status", "--admin", mesh.admin_url, "--format", "json")
    assert done.returncode == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    return data


def test_a_hostile_agent_cannot_rotate_the_ca_or_read_audit_records(mesh: Mesh) -> None:
    token_file = mesh.state_dir / "admin" / "token"
    ca_before = _status(mesh)["ca"]
    host, port = mesh.admin_url.removeprefix("http://").rsplit(":", 1)
    code = ATTACK.format(host=host, port=int(port), token_file=str(token_file))

    seen = mesh.agent_python("researcher", code)

    assert seen["healthz"] == 200  # probes stay public
    assert seen["honest"] == 200
    assert len(seen["requests"]) == 7
    for what, answers in seen["requests"].items():
        for status, challenge in answers:
            assert status == 401, (what, status)
            assert challenge.startswith('Bearer realm="meshgate-admin"'), what
    for body in seen["bodies"]:
        assert json.loads(body).keys() == {"error"}
        for private in ("accountant", "billing", "spiffe://", "request_id", "sk-billing"):
            assert private not in body
    assert _status(mesh)["ca"] == ca_before  # the CA never rolled

    # the operator's commands, from the mesh's directory, find the token and work
    status = mesh.meshgate("status", "--admin", mesh.admin_url)
    assert status.returncode == 0, status.stderr
    assert "policy" in status.stdout
    records: list[dict[str, object]] = []
    for _ in range(40):
        done = mesh.meshgate(
            "audit", "query", "--control-plane", mesh.admin_url, "--agent", "researcher",
            "--destination", "docs", "--format", "json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        if records:  # the gateway's spool is shipped asynchronously
            break
        time.sleep(0.3)
    assert records and records[0]["decision"] == "allowed"
    token = token_file.read_text().strip()
    assert token not in status.stdout + status.stderr + done.stdout + done.stderr

    # what keeps the token from the agent: its user cannot open the file (0600 in 0700) and
    # `sidecar run` does not pass MESHGATE_ADMIN_TOKEN on
    assert seen["env_token"] is False
    if seen["uid"] == os.getuid():
        pytest.xfail("sidecar run started the agent as the control plane's own user")
    assert seen["token_file"] == "PermissionError"


def test_the_operator_is_told_what_to_do_without_the_token(mesh: Mesh) -> None:
    done = mesh.meshgate(
        "status", "--admin", mesh.admin_url, "--state-dir", str(mesh.root / "scripts")
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert "needs its admin token" in done.stderr and "--admin-token-file" in done.stderr

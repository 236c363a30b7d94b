"""Delegation end to end: a supervisor under `meshgate sidecar run` creates a sub-agent through
its own sidecar, then runs it under its own `meshgate sidecar run`; real Envoy throughout."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from builders import AdsClient, free_port
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from harness import audit_records, control_plane, gateway, until, upstream, write_policy

from meshgate.delegation.expand import KEY_HEADER
from meshgate.xds import types

pytestmark = pytest.mark.e2e

AGENTS = """\
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: supervisor}
spec:
  agent: supervisor
  delegation: {maxSubAgents: 2, maxTtl: 10m}
  egress:
    - destination: alpha
    - destination: beta
      methods: [GET]
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: coder}
spec:
  agent: coder
  egress:
    - destination: beta
"""

# The sub-agent: what its narrowed rights allow and refuse, and who it is, whatever it claims.
SUB_AGENT = """\
import json, httpx
out = {}
spoof = {"x-meshgate-agent": "spiffe://agents.test/agent/supervisor"}
with httpx.Client(timeout=10) as c:
    for key, method, url in (
        ("kept", "GET", "http://alpha.internal/public/page"),
        ("outside_path", "GET", "http://alpha.internal/private"),
        ("narrowed_method", "POST", "http://alpha.internal/public/page"),
        ("rule_not_kept", "GET", "http://beta.internal/x"),
    ):
        r = c.request(method, url, headers=spoof)
        out[key] = [r.status_code, r.json()]
    # it may delegate in turn, within its own (narrowed) rights and limits
    api = "http://meshgate.internal/v1/sub-agents"
    for key, ask in (
        ("deeper_too_wide", {"name": "wide", "ttl": "1m",
                             "rules": [{"rule": 0, "paths": ["/private"]}]}),
        ("deeper", {"name": "deeper", "ttl": "1m",
                    "rules": [{"rule": 0, "paths": ["/public/docs/*"]}]}),
        ("deeper_again", {"name": "again", "ttl": "1m", "rules": [{"rule": 0}]}),
    ):
        r = c.post(api, json=ask, headers=spoof)
        out[key] = [r.status_code, r.json()]
print("SUB " + json.dumps(out))
"""

CODER = """\
import json, httpx
r = httpx.post("http://meshgate.internal/v1/sub-agents", timeout=10,
               json={"name": "mine", "ttl": "1m", "rules": [{"rule": 0}]})
print(json.dumps([r.status_code, r.json()]))
"""

SUPERVISOR = """\
import json, os, subprocess, sys, httpx
cli, xds, workdir = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
api = "http://meshgate.internal/v1/sub-agents"
with httpx.Client(timeout=20) as c:
    ask = {"name": "web-1", "ttl": "5m",
           "rules": [{"rule": 0, "methods": ["GET"], "paths": ["/public/*"]}],
           "delegation": {"maxSubAgents": 1, "maxTtl": "1m"}}
    r = c.post(api, json=ask)
    out["create"] = [r.status_code, r.json()]
    more = {"name": "greedy", "ttl": "5m", "rules": [{"rule": 1, "methods": ["POST"]}]}
    r = c.post(api, json=more)
    out["more_than_parent"] = [r.status_code, r.json()]
    r = c.post(api, json={"name": "slow", "ttl": "1h", "rules": [{"rule": 0}]})
    out["too_long"] = [r.status_code, r.json()]
    # another agent's identity and a guessed gateway key: ignored, the certificate decides
    forged = {"x-meshgate-agent": "spiffe://agents.test/agent/coder", "KEY_HEADER": "guess"}
    r = c.post(api, json={"name": "evil", "ttl": "5m", "rules": [{"rule": 0}]}, headers=forged)
    out["forged"] = [r.status_code, r.json()]
    r = c.post(api, json={"name": "third", "ttl": "5m", "rules": [{"rule": 0}]})
    out["over_max"] = [r.status_code, r.json()]
    r = c.get(api, headers=forged)
    out["list"] = [r.status_code, r.json()]
token = out["create"][1]["join_token"]
with open(os.path.join(workdir, "sub.token"), "w") as f:
    f.write(token)
env = {k: v for k, v in os.environ.items() if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY")}
sub = subprocess.run(
    [sys.executable, "-m", "meshgate.cli", "sidecar", "run", "--agent", "supervisor.web-1",
     "--control-plane", xds, "--state-dir", os.path.join(workdir, "sub-state"),
     "--token-file", os.path.join(workdir, "sub.token"), "--insecure", "--insecure-same-user",
     "--", sys.executable, os.path.join(workdir, "sub_agent.py")],
    env=env, capture_output=True, text=True, timeout=120,
)
out["sub_rc"] = sub.returncode
out["sub_err"] = sub.stderr[-2000:]
lines = [l for l in sub.stdout.splitlines() if l.startswith("SUB ")]
out["sub"] = json.loads(lines[-1][4:]) if lines else None
print("SUPERVISOR " + json.dumps(out))
""".replace("KEY_HEADER", KEY_HEADER)


async def test_supervisor_delegates_a_narrower_sub_agent(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("alpha") as up_a, upstream("beta") as up_b:
        policy = tmp_path / "policies"
        write_policy(policy, listen, {"alpha": up_a.port, "beta": up_b.port}, agents={})
        (policy / "agents.yaml").write_text(AGENTS)
        async with (
            control_plane(policy, tmp_path / "state", require_tokens=True, mtls=True) as cp,
            gateway(cp, tmp_path, audit=True),
        ):
            assert cp.tokens is not None and cp.delegation is not None
            token, _ = cp.tokens.create("agent/supervisor", 600)
            (tmp_path / "supervisor.token").write_text(token)
            (tmp_path / "sub_agent.py").write_text(SUB_AGENT)
            (tmp_path / "supervisor.py").write_text(SUPERVISOR)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshgate.cli", "sidecar", "run",
                "--agent", "supervisor", "--control-plane", cp.xds_address,
                "--state-dir", str(tmp_path / "sup-state"),
                "--token-file", str(tmp_path / "supervisor.token"),
                "--insecure", "--insecure-same-user", "--",
                sys.executable, str(tmp_path / "supervisor.py"),
                "meshgate", cp.xds_address, str(tmp_path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ},
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 240)
            assert proc.returncode == 0, err.decode()[-3000:]
            lines = [x for x in out.decode().splitlines() if x.startswith("SUPERVISOR ")]
            result = json.loads(lines[-1].removeprefix("SUPERVISOR "))

            created = result["create"]
            assert created[0] == 201, created
            assert created[1]["agent"] == "supervisor.web-1"
            assert created[1]["chain"] == "supervisor>web-1"
            assert created[1]["spiffe_id"] == "spiffe://agents.test/agent/supervisor/sub/web-1"
            # more than the parent has: refused, saying what exceeds it
            status, body = result["more_than_parent"]
            assert status == 403 and body["error"] == "delegation_refused"
            assert "method 'POST' is not allowed by the parent's rule" in body["reason"]
            status, body = result["too_long"]
            assert status == 403 and "maxTtl" in body["reason"]
            # forged identity header and key: the sub-agent is the certificate holder's
            status, body = result["forged"]
            assert status == 201 and body["agent"] == "supervisor.evil", body
            status, body = result["over_max"]
            assert status == 403 and "maxSubAgents is 2" in body["reason"]
            status, body = result["list"]
            assert body["agent"] == "supervisor"
            assert [s["agent"] for s in body["sub_agents"]] == [
                "supervisor.evil",
                "supervisor.web-1",
            ]

            sub = result["sub"]
            assert sub is not None, result["sub_err"]
            assert sub["kept"][0] == 200 and sub["kept"][1]["upstream"] == "alpha"
            for key in ("outside_path", "narrowed_method", "rule_not_kept"):
                assert sub[key][0] == 403, (key, sub[key])
                assert sub[key][1]["agent"] == "spiffe://agents.test/agent/supervisor/sub/web-1"
            assert [h["path"] for h in up_a.hits] == ["/public/page"]
            assert not up_b.hits
            # a sub-sub-agent: checked against the sub-agent's rights, not the supervisor's
            status, body = sub["deeper_too_wide"]
            assert status == 403
            assert "path '/private' is not inside the parent's paths (/public/*)" in body["reason"]
            status, body = sub["deeper"]
            assert status == 201, body
            assert body["agent"] == "supervisor.web-1.deeper"
            assert body["chain"] == "supervisor>web-1>deeper"
            assert body["spiffe_id"] == (
                "spiffe://agents.test/agent/supervisor/sub/web-1/sub/deeper"
            )
            status, body = sub["deeper_again"]
            assert status == 403 and "maxSubAgents is 1" in body["reason"]
            assert {s["agent"] for s in cp.status_json()["sub_agents"]} == {
                "supervisor.evil",
                "supervisor.web-1",
                "supervisor.web-1.deeper",
            }

            # an agent without `delegation` has no route to the endpoint at all
            token, _ = cp.tokens.create("agent/coder", 600)
            (tmp_path / "coder.token").write_text(token)
            (tmp_path / "coder.py").write_text(CODER)
            coder = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshgate.cli", "sidecar", "run",
                "--agent", "coder", "--control-plane", cp.xds_address,
                "--state-dir", str(tmp_path / "coder-state"),
                "--token-file", str(tmp_path / "coder.token"),
                "--insecure", "--insecure-same-user", "--",
                sys.executable, str(tmp_path / "coder.py"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(coder.communicate(), 120)
            assert coder.returncode == 0, err.decode()[-3000:]
            status, body = json.loads(out.decode().strip().splitlines()[-1])
            assert status == 403 and body["error"] == "egress_denied", body

            # audit: every request of the sub-agent carries the chain, from its certificate
            def sub_records() -> list[object]:
                return audit_records(cp, agent="supervisor.web-1")

            records = await until(lambda: len(sub_records()) >= 5, 15, "sub-agent records")
            records = audit_records(cp, agent="supervisor.web-1")
            assert {r.delegation_chain for r in records} == {"supervisor>web-1"}
            assert {r.spiffe_id for r in records} == {
                "spiffe://agents.test/agent/supervisor/sub/web-1"
            }
            by_path = {(r.method, r.path): r.decision for r in records}
            assert by_path[("GET", "/public/page")] == "allowed"
            assert by_path[("GET", "/private")] == "denied"
            assert by_path[("POST", "/public/page")] == "denied"
            supervisor = audit_records(cp, agent="supervisor")
            assert supervisor and {r.delegation_chain for r in supervisor} == {""}

            # the endpoint itself answers only requests that came through a gateway
            port = cp.delegation.server.port
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.get(
                    f"http://127.0.0.1:{port}/v1/sub-agents",
                    headers={"x-meshgate-agent": "spiffe://agents.test/agent/supervisor"},
                )
            assert r.status_code == 403 and r.json()["error"] == "not_through_gateway"

            # the parent's policy changes the rule its sub-agents kept: they lose it at once
            def served_subs() -> list[str]:
                served = cp.publisher.served_model()
                assert served is not None
                return [a.agent for a in served.agents if "." in a.agent]

            assert served_subs() == [
                "supervisor.evil",
                "supervisor.web-1",
                "supervisor.web-1.deeper",
            ]
            (policy / "agents.yaml").write_text(
                AGENTS.replace(
                    "    - destination: alpha\n",
                    "    - destination: alpha\n      paths: [/public/*]\n",
                    1,
                )
            )
            await until(lambda: not served_subs(), 10, "sub-agents revoked")
            assert cp.delegation.registry.all() == []
            # and its join token (unexpired, never in revoked.json) joins no more
            detail = await xds_refusal(cp.xds_address, created[1]["join_token"])
            gone = "sub-agent supervisor.web-1 no longer exists (deleted, expired or revoked)"
            assert detail == gone


async def xds_refusal(address: str, token: str) -> str:
    client = AdsClient(address, metadata=(("authorization", f"Bearer {token}"),))
    node = base_pb2.Node(id="agent/supervisor.web-1/pod-1")
    client.send(discovery_pb2.DiscoveryRequest(node=node, type_url=types.CLUSTER))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.recv()
    finally:
        await client.close()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return err.value.details() or ""


BUDGET_AGENTS = """\
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: supervisor}
spec:
  agent: supervisor
  delegation: {maxSubAgents: 1, maxTtl: 10m}
  budgets:
    - {name: calls, requests: 4, window: day}
  egress:
    - destination: alpha
"""

SPENDER = """\
import json, httpx
print(json.dumps([httpx.get(f"http://alpha.internal/sub/{i}", timeout=10).status_code
                  for i in range(2)]))
"""

BUDGET_SUPERVISOR = """\
import json, os, subprocess, sys, httpx
xds, workdir = sys.argv[1], sys.argv[2]
r = httpx.post("http://meshgate.internal/v1/sub-agents", timeout=20,
               json={"name": "spender", "ttl": "5m", "rules": [{"rule": 0}]})
assert r.status_code == 201, r.text
with open(os.path.join(workdir, "spender.token"), "w") as f:
    f.write(r.json()["join_token"])
env = {k: v for k, v in os.environ.items() if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY")}
sub = subprocess.run(
    [sys.executable, "-m", "meshgate.cli", "sidecar", "run", "--agent", "supervisor.spender",
     "--control-plane", xds, "--state-dir", os.path.join(workdir, "spender-state"),
     "--token-file", os.path.join(workdir, "spender.token"), "--insecure",
     "--insecure-same-user", "--", sys.executable, os.path.join(workdir, "spender.py")],
    env=env, capture_output=True, text=True, timeout=120,
)
spent = json.loads(sub.stdout.strip().splitlines()[-1]) if sub.stdout.strip() else sub.stderr
own = [httpx.get(f"http://alpha.internal/own/{i}", timeout=10) for i in range(2)]
print("BUDGET " + json.dumps({"sub": spent, "own": [[r.status_code, r.text] for r in own]}))
"""


async def test_sub_agents_spend_from_the_parents_budget(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("alpha") as up_a:
        policy = tmp_path / "policies"
        write_policy(policy, listen, {"alpha": up_a.port}, agents={})
        (policy / "agents.yaml").write_text(BUDGET_AGENTS)
        async with (
            control_plane(policy, tmp_path / "state", require_tokens=True, mtls=True) as cp,
            gateway(cp, tmp_path),
        ):
            assert cp.tokens is not None
            token, _ = cp.tokens.create("agent/supervisor", 600)
            (tmp_path / "supervisor.token").write_text(token)
            (tmp_path / "spender.py").write_text(SPENDER)
            (tmp_path / "supervisor.py").write_text(BUDGET_SUPERVISOR)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshgate.cli", "sidecar", "run",
                "--agent", "supervisor", "--control-plane", cp.xds_address,
                "--state-dir", str(tmp_path / "sup-state"),
                "--token-file", str(tmp_path / "supervisor.token"),
                "--insecure", "--insecure-same-user", "--",
                sys.executable, str(tmp_path / "supervisor.py"), cp.xds_address, str(tmp_path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-3000:]
    line = [x for x in out.decode().splitlines() if x.startswith("BUDGET ")][-1]
    result = json.loads(line.removeprefix("BUDGET "))
    assert result["sub"] == [200, 200], result
    # four calls a day for the supervisor and everything it delegated (asking for the
    # sub-agent was one, through the gateway): its own second call is the fifth, refused
    assert [status for status, _ in result["own"]] == [200, 429], result
    refusal = json.loads(result["own"][1][1])
    assert "delegation:supervisor/calls" in json.dumps(refusal), refusal
    assert [h["path"] for h in up_a.hits] == ["/sub/0", "/sub/1", "/own/0"]

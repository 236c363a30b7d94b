"""Replay agrees with the gateway: for every request a real gateway Envoy decided and recorded,
the replay's evaluation of the same policy's generated routes gives the recorded decision."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from builders import free_port
from harness import (
    MESH,
    audit_records,
    control_plane,
    gateway,
    sidecar,
    until,
    upstream,
    via_gateway,
    write_policy,
)

from meshgate.audit.record import AuditRecord
from meshgate.policy.loader import load_policy_dir
from meshgate.replay.compare import RecordGroup, recorded_outcome, replay
from meshgate.replay.records import read_groups, to_groups
from meshgate.replay.routes import PolicyRoutes

pytestmark = pytest.mark.e2e

POLICY = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: api}}
spec: {{host: api.internal, port: 80, tls: none, address: "127.0.0.1:{port}"}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: mcp}}
spec: {{host: mcp.internal, port: 80, tls: none, address: "127.0.0.1:{port}"}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: teams}}
spec: {{host: teams.internal, port: 80, tls: none, address: "127.0.0.1:{port}"}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: raw}}
spec: {{host: raw.internal, port: {port}, tls: passthrough, address: "127.0.0.1:{port}"}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: researcher}}
spec:
  agent: researcher
  egress:
    - destination: api
      methods: [GET, POST]
      paths: ["/v1/*", "/status"]
    - destination: mcp
      methods: [POST, GET]
      paths: ["/mcp"]
      tools: [read_file, search_code]
    - destination: teams
      headers: [{{name: x-team, value: blue}}]
    - destination: raw
"""


JSON = {"content-type": "application/json"}


def rpc(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}


async def raw_connect(port: int, authority: str, agent: str = "researcher") -> str:
    """A bare CONNECT to the gateway; the x-request-id of its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nx-meshgate-agent: {agent}"
    writer.write(f"{head}\r\n\r\n".encode())
    await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode().lower()
    writer.close()
    for line in head.split("\r\n"):
        if line.startswith("x-request-id:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no request id in {head!r}")


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 16):
        yield data[i : i + 16]


def chunked(message: dict[str, Any]) -> AsyncIterator[bytes]:
    """A body sent chunked: no Content-Length in the headers the route is first chosen on."""
    return _chunks(json.dumps(message).encode())


def group_of(r: AuditRecord) -> RecordGroup:
    return RecordGroup(
        r.agent,
        r.spiffe_id,
        r.host,
        r.method,
        r.path,
        r.mcp_method,
        r.mcp_tool,
        r.bytes_received > 0,
        r.gateway.startswith("gateway/"),
        r.decision,
        r.reason,
        r.destination,
        1,
        r.request_id,
    )


async def test_replay_of_the_served_policy_gives_every_recorded_decision(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("tools") as up:
        policy = tmp_path / "policies"
        policy.mkdir()
        (policy / "mesh.yaml").write_text(MESH.format(port=listen))
        (policy / "rules.yaml").write_text(POLICY.format(port=up.port))
        async with (
            control_plane(policy, tmp_path / "state") as cp,
            gateway(cp, tmp_path, audit=True),
        ):
            ids: list[str] = []

            async def send(host: str, path: str = "/", method: str = "GET", **kw: Any) -> int:
                r = await via_gateway(listen, host, path, method, **kw)
                # (a request Envoy refuses while normalising its path gets no id back)
                ids.append(r.headers.get("x-request-id", ""))
                return r.status_code

            mcp = {"host": "mcp.internal", "path": "/mcp", "method": "POST"}
            statuses = [
                await send("api.internal", "/v1/items/1"),  # allowed
                await send("api.internal:80", "/v1/items/2?q=1"),  # port, query
                await send("API.Internal", "/v1/"),  # authority case
                await send("api.internal", "/status"),  # exact path
                await send("api.internal", "/status?verbose=1"),  # exact path and a query
                await send("api.internal", "/status/x"),  # refused: exact is exact
                await send("api.internal", "/v2/items"),  # refused by path
                await send("api.internal", "/v1/../admin"),  # normalised, then refused
                await send("api.internal", "/v1/items/1", "DELETE"),  # refused by method
                await send("api.internal", "/v1/items", "POST", json={"a": 1}),  # a body
                await send("api.internal", "/v1/items", agent="intruder"),  # another agent
                await send("api.internal", "/v1/items", agent=None),  # no agent header
                await send("nowhere.internal", "/v1/items"),  # unknown destination
                await send("api.internal:8080", "/v1/items"),  # a port no destination has
                await send("api.internal", "/v1/a%5cadmin"),  # path guard: not replayed
                await send("api.internal", "/v1/" + "a" * 9000),  # path guard: not replayed
                await send(**mcp, json=rpc("initialize", {"protocolVersion": "2025-06-18"})),
                await send(**mcp, json=rpc("tools/list")),
                await send(**mcp, json=rpc("tools/call", {"name": "read_file"})),
                await send(**mcp, json=rpc("tools/call", {"name": "search_code"})),
                await send(**mcp, json=rpc("tools/call", {"name": "delete_repo"})),
                await send(**mcp, json=rpc("tools/call", {"name": "read_file_x"})),
                await send(**mcp, content=b"not json", headers={"content-type": "text/plain"}),
                await send(
                    **mcp, content=chunked(rpc("tools/call", {"name": "read_file"})), headers=JSON
                ),
                await send(**mcp, content=chunked(rpc("tools/call", {"name": "rm"})), headers=JSON),
                # chunked, no Content-Type: the filter does not parse it, the body guard refuses
                await send(**mcp, content=chunked(rpc("tools/call", {"name": "rm"}))),
                await send("mcp.internal", "/mcp", "GET"),  # no body: an SSE stream
                await send("mcp.internal", "/mcp", "DELETE"),  # refused by method
                await send("mcp.internal", "/other", "POST", json=rpc("tools/list")),
                await send("teams.internal", "/x", headers={"x-team": "blue"}),
                await send("teams.internal", "/x", headers={"x-team": "red"}),
                await send("teams.internal", "/x"),
            ]
            ids.append(await raw_connect(listen, f"raw.internal:{up.port}"))  # tunnel allowed
            ids.append(await raw_connect(listen, f"raw.internal:{up.port}", "intruder"))
            ids.append(await raw_connect(listen, "api.internal:80"))  # CONNECT to tls: none
            ids.append(await raw_connect(listen, "nowhere.internal:443"))
            assert 200 in statuses and 403 in statuses

            def stored() -> dict[str, AuditRecord] | None:
                got = {r.request_id: r for r in audit_records(cp)}
                return got if len(got) >= len(ids) else None

            records = await until(stored, 20, "every request's record")
            assert len(records) == len(ids)
            assert set(ids) - {""} <= set(records)

            model = load_policy_dir(policy)
            routes = PolicyRoutes(model)
            replayed, skipped, undecided = 0, [], 0
            seen: set[tuple[str, str]] = set()
            for rec in records.values():
                seen.add((rec.decision, rec.reason))
                was = recorded_outcome(rec.decision, rec.reason)
                if was is None:
                    skipped.append(rec.reason)
                    continue
                verdict = routes.evaluate(group_of(rec).request())
                possible = {
                    "allowed" if d.decision == "allowed" else f"refused: {d.reason}"
                    for d in verdict.decisions
                }
                where = f"{rec.method} {rec.host}{rec.path} {rec.mcp_tool}: {verdict}"
                if verdict.undecided:  # a rule header: the gateway's answer is one of them
                    undecided += 1
                    assert verdict.unknown_headers == ("x-team",), where
                    assert was in possible, where
                else:
                    assert possible == {was}, where
                    if was == "allowed":
                        assert verdict.decision.agent == rec.agent, where
                        assert verdict.decision.destination == rec.destination, where
                replayed += 1
            # the variety the test means to cover really happened
            reasons = {reason for _, reason in seen}
            assert {"egress_denied", "tool_denied", "unknown_destination"} <= reasons, seen
            assert ("allowed", "") in seen
            assert sorted(skipped) == [
                "mcp_unparsed: a body on a request routed as body-less",
                "path_not_canonical",
                "path_too_long",
            ]
            assert undecided == 3
            assert replayed == len(ids) - 3
            calls = [(r.mcp_tool, r.decision, r.reason) for r in records.values() if r.mcp_tool]
            assert calls.count(("read_file", "allowed", "")) == 2  # one of them chunked
            assert calls.count(("rm", "denied", "tool_denied")) == 1

            # the CLI's path: the store read back, grouped, replayed: nothing changes
            groups = list(to_groups(read_groups(cp.audit_url)))
            report = replay(groups, routes)
            assert (report.newly_refused, report.newly_allowed) == (0, 0)
            assert report.undecided == 3  # the x-team requests: their answer is not recorded
            assert report.exit_code == 0
            assert replay(groups, routes, strict=True).exit_code == 2

            # a candidate without the api rule: what it would refuse, from the same records
            (policy / "rules.yaml").write_text(
                POLICY.format(port=up.port).replace(
                    'paths: ["/v1/*", "/status"]', 'paths: ["/status"]'
                )
            )
            narrowed = replay(groups, PolicyRoutes(load_policy_dir(policy)))
            allowed_v1 = sum(
                1
                for r in records.values()
                if r.decision == "allowed"
                and r.host.lower().startswith("api.internal")
                and r.path.startswith("/v1/")
            )
            assert allowed_v1 == 4
            assert (narrowed.newly_refused, narrowed.newly_allowed) == (allowed_v1, 0)
            refused = [r for r in narrowed.rows.values() if r.change == "newly_refused"]
            assert {(r.agent, r.destination, r.now) for r in refused} == {
                ("researcher", "api", "refused: egress_denied")
            }
            assert {r.change for r in narrowed.rows.values()} == {"newly_refused", "undecided"}


async def test_with_mtls_agents_are_replayed_by_their_certificate_identity(
    tmp_path: Path,
) -> None:
    listen = free_port()
    async with upstream("alpha") as up_a, upstream("beta") as up_b:
        policy = tmp_path / "policies"
        write_policy(
            policy,
            listen,
            {"alpha": up_a.port, "beta": up_b.port},
            agents={"researcher": ["alpha"], "coder": ["beta"]},
        )
        async with (
            control_plane(policy, tmp_path / "state", mtls=True) as cp,
            gateway(cp, tmp_path, audit=True),
        ):
            sent = 0
            for agent in ("researcher", "coder"):
                async with (
                    sidecar(cp, tmp_path, agent) as proxy,
                    httpx.AsyncClient(proxy=proxy, timeout=10) as client,
                ):
                    for url in ("http://alpha.internal/x", "http://beta.internal/y"):
                        await client.get(url)
                        sent += 1
            records = await until(
                lambda: (got := audit_records(cp)) and len(got) >= sent and got,
                20,
                "every request's record",
            )
            assert len(records) == sent
            routes = PolicyRoutes(load_policy_dir(policy))
            outcomes = set()
            for rec in records:
                assert rec.spiffe_id == f"spiffe://agents.test/agent/{rec.agent}"
                was = recorded_outcome(rec.decision, rec.reason)
                verdict = routes.evaluate(group_of(rec).request())
                assert not verdict.undecided
                now = (
                    "allowed"
                    if verdict.decision.decision == "allowed"
                    else (f"refused: {verdict.decision.reason}")
                )
                assert now == was, (rec, verdict)
                outcomes.add((rec.agent, rec.destination, now))
            assert outcomes == {
                ("researcher", "alpha", "allowed"),
                ("researcher", "beta", "refused: egress_denied"),
                ("coder", "alpha", "refused: egress_denied"),
                ("coder", "beta", "allowed"),
            }


CODER = """\
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: coder}
spec:
  agent: coder
  egress:
    - destination: mcp
      paths: ["/mcp*"]
      tools: [write_file]
    - destination: api
      methods: [PUT, DELETE]
      paths: ["/v1"]
"""


async def test_a_seeded_random_mix_agrees_request_by_request(tmp_path: Path) -> None:
    """Requests the test did not pick one by one: agents, hosts, methods, paths and bodies
    drawn with a fixed seed; every record the gateway stored is replayed to its decision."""
    rng = random.Random(20)
    listen = free_port()
    async with upstream("tools") as up:
        policy = tmp_path / "policies"
        policy.mkdir()
        (policy / "mesh.yaml").write_text(MESH.format(port=listen))
        (policy / "rules.yaml").write_text(POLICY.format(port=up.port) + CODER)
        async with (
            control_plane(policy, tmp_path / "state") as cp,
            gateway(cp, tmp_path, audit=True),
        ):
            hosts = ["api.internal", "api.internal:80", "API.INTERNAL", "mcp.internal"]
            hosts += ["mcp.internal:80", "teams.internal", "nowhere.internal"]
            paths = ["/v1/a", "/v1/", "/v1", "/status", "/status/", "/mcp", "/mcp/x", "/other"]
            paths += ["/v1/items/9?x=1", "/MCP"]
            tools = ["read_file", "search_code", "write_file", "", "read_file "]
            agents = ["researcher", "coder", "intruder", None]
            methods = ["GET", "POST", "DELETE", "PUT"]
            # requests a rule admits, then (half of them) one field changed at random
            allowed = [
                ("researcher", "api.internal", "GET", "/v1/a", ""),
                ("researcher", "api.internal", "POST", "/status", ""),
                ("researcher", "mcp.internal", "POST", "/mcp", "rpc"),
                ("researcher", "mcp.internal", "GET", "/mcp", ""),
                ("coder", "mcp.internal", "POST", "/mcp/x", "rpc"),
                ("coder", "api.internal", "PUT", "/v1", ""),
                ("researcher", "teams.internal", "GET", "/x", "team"),
            ]
            sent = 0
            for _ in range(160):
                fields = list(rng.choice(allowed))
                if rng.random() < 0.5:
                    which = rng.randrange(5)
                    pools: list[list[Any]] = [agents, hosts, methods, paths, ["", "rpc", "text"]]
                    fields[which] = rng.choice(pools[which])
                agent, host, method, path, body = fields
                kw: dict[str, Any] = {}
                if body == "rpc":
                    call = rng.choice(["initialize", "tools/list", "tools/call", "tools/call"])
                    params = {"name": rng.choice(tools)} if call == "tools/call" else {}
                    kw["json"] = rpc(call, params)
                elif body == "text":
                    kw["content"] = b"hello"
                    kw["headers"] = {"content-type": "text/plain"}
                elif body == "team":
                    kw["headers"] = {"x-team": rng.choice(["blue", "blue", "red"])}
                await via_gateway(listen, host, path, method, agent=agent, **kw)
                sent += 1
            records = await until(
                lambda: (got := audit_records(cp)) and len(got) >= sent and got,
                30,
                "every request's record",
            )
            assert len(records) == sent
            routes = PolicyRoutes(load_policy_dir(policy))
            compared: dict[str, int] = {}
            for rec in records:
                was = recorded_outcome(rec.decision, rec.reason)
                if was is None:
                    continue
                verdict = routes.evaluate(group_of(rec).request())
                possible = {
                    "allowed" if d.decision == "allowed" else f"refused: {d.reason}"
                    for d in verdict.decisions
                }
                where = f"{rec.agent} {rec.method} {rec.host}{rec.path} {rec.mcp_method}"
                assert was in possible, (where, rec.mcp_tool, rec.bytes_received, verdict)
                if not verdict.undecided:
                    assert possible == {was}, (where, verdict)
                compared[was] = compared.get(was, 0) + 1
            # the mix reached every kind of route decision
            assert set(compared) >= {
                "allowed",
                "refused: egress_denied",
                "refused: tool_denied",
                "refused: mcp_unparsed",
                "refused: unknown_destination",
            }, compared
            assert compared["allowed"] >= 40, compared
            assert sum(compared.values()) >= 140, compared

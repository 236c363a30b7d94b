"""The audit log end to end: real gateway and sidecar Envoys, the spool shipper, SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path

import grpc
import httpx
import pytest
from builders import admin_auth, free_port
from envoy.service.accesslog.v3 import als_pb2
from harness import (
    MESH,
    audit_record,
    audit_records,
    control_plane,
    gateway,
    sidecar,
    until,
    upstream,
    via_gateway,
    write_policy,
)

from meshgate.audit.spool import METHOD, SpoolShipper

pytestmark = pytest.mark.e2e

POLICY = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: search}}
spec: {{host: search.internal, port: 80, tls: none, address: "127.0.0.1:{up}"}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: llm}}
spec:
  host: llm.internal
  port: 80
  tls: none
  address: 127.0.0.1:{up}
  credentials: {{header: Authorization, secret: llm-key, format: "Bearer {{secret}}"}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: dead}}
spec: {{host: dead.internal, port: 80, tls: none, address: "127.0.0.1:{dead}"}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: researcher}}
spec:
  agent: researcher
  egress:
    - destination: search
      methods: [GET]
      paths: ["/v1/search"]
    - destination: llm
      methods: [POST]
      rateLimit: {{requests: 1, per: 1m}}
    - destination: dead
"""

KEY = "sk-audit-SECRET-5f1e2d3c4b5a6978"
SPIFFE = "spiffe://agents.test/agent/researcher"


async def test_every_outcome_is_one_record_with_who_what_and_which_policy(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("tools") as up:
        policy = tmp_path / "policies"
        (policy / "secrets").mkdir(parents=True)
        (policy / "mesh.yaml").write_text(
            MESH.format(port=listen) + "  secrets: {provider: file, path: ./secrets}\n"
        )
        (policy / "rules.yaml").write_text(POLICY.format(up=up.port, dead=free_port()))
        (policy / "secrets" / "llm-key").write_text(KEY)
        async with (
            control_plane(policy, tmp_path / "state", mtls=True) as cp,
            gateway(cp, tmp_path, audit=True),
            sidecar(cp, tmp_path, "researcher") as proxy,
            httpx.AsyncClient(proxy=proxy, timeout=10) as client,
        ):
            assert cp.policy.model is not None
            version = cp.policy.model.version
            sent = {
                "allowed": await client.get("http://search.internal/v1/search?q=private"),
                "unknown": await client.get("http://unknown.example/x"),
                "forbidden": await client.get("http://search.internal/v1/admin"),
                "chat": await client.post("http://llm.internal/v1/chat", content=b"hello llm"),
                "limited": await client.post("http://llm.internal/v1/chat", content=b"again"),
                "failed": await client.get("http://dead.internal/down"),
            }
            expected = {
                "allowed": 200,
                "unknown": 403,
                "forbidden": 403,
                "chat": 200,
                "limited": 429,
                "failed": 503,
            }
            assert {k: r.status_code for k, r in sent.items()} == expected
            assert up.hits[-1]["headers"]["Authorization"] == f"Bearer {KEY}"
            ids = {k: r.headers["x-request-id"] for k, r in sent.items()}
            assert len(set(ids.values())) == len(ids)
            # every answer, refusals included, says which policy decided
            assert {r.headers["x-meshgate-policy"] for r in sent.values()} == {version}

            rec = {k: await audit_record(cp, rid) for k, rid in ids.items()}
            ok = rec["allowed"]
            assert (ok.agent, ok.spiffe_id, ok.destination) == ("researcher", SPIFFE, "search")
            assert (ok.host, ok.method, ok.path) == ("search.internal", "GET", "/v1/search")
            assert (ok.status, ok.decision, ok.policy_version) == (200, "allowed", version)
            assert ok.gateway == "gateway/e2e"
            assert ok.bytes_sent == len(sent["allowed"].content) and ok.bytes_received == 0
            assert 0 < ok.duration_ms < 5000
            assert abs((ok.timestamp - rec["failed"].timestamp).total_seconds()) < 30

            chat = rec["chat"]
            assert (chat.decision, chat.destination, chat.method) == ("allowed", "llm", "POST")
            assert chat.bytes_received == len(b"hello llm")

            def outcome(key: str) -> tuple[str, str, int, str]:
                r = rec[key]
                return r.decision, r.reason, r.status, r.destination

            assert outcome("unknown") == ("denied", "unknown_destination", 403, "")
            assert rec["unknown"].host == "unknown.example"
            assert outcome("forbidden") == ("denied", "egress_denied", 403, "search")
            assert outcome("limited") == ("rate_limited", "rate_limited", 429, "llm")
            failed = rec["failed"]
            assert (failed.decision, failed.status, failed.destination) == (
                "upstream_error",
                503,
                "dead",
            )
            assert "connection_failure" in failed.reason
            for r in rec.values():
                assert (r.agent, r.spiffe_id, r.policy_version) == ("researcher", SPIFFE, version)

            # the admin API serves them too
            async with httpx.AsyncClient(headers=admin_auth(cp)) as direct:
                listed = (
                    await direct.get(
                        f"http://{cp.admin_address}/v1/audit",
                        params={"decision": "denied", "agent": "researcher"},
                    )
                ).json()
                metrics = (await direct.get(f"http://{cp.admin_address}/metrics")).text
            assert "meshgate_audit_records_stored_total 6.0" in metrics
            # the push queue is visible, and what the nodes were sent is counted per type
            assert "meshgate_xds_push_pending 0.0" in metrics
            counted = r'meshgate_xds_responses_total\{type="(\w+)"\} (\S+)'
            by_type = dict(re.findall(counted, metrics))
            assert float(by_type["cds"]) >= 2 and float(by_type["lds"]) >= 2  # gateway and sidecar
            assert {r["request_id"] for r in listed["records"]} == {
                ids["unknown"],
                ids["forbidden"],
            }

            # nothing secret reaches the audit log: the injected key, private keys, the query
            text = json.dumps([r.to_json() for r in audit_records(cp)])
            assert KEY not in text
            assert "PRIVATE KEY" not in text and "private" not in text
            keys = [p.read_text() for p in (tmp_path / "state").rglob("*.pem")]
            keys = [k for k in keys if "PRIVATE KEY" in k]
            assert keys, "expected the CA's private keys in the state directory"
            for pem in keys:
                body = "".join(pem.splitlines()[1:-1])
                assert body[:40] not in text


async def test_forged_record_streams_are_refused(tmp_path: Path) -> None:
    """With join tokens required, the access-log service on the xDS port authenticates too."""
    write_policy(tmp_path / "policies", free_port(), {"tools": free_port()})
    async with control_plane(tmp_path / "policies", tmp_path / "state", require_tokens=True) as cp:
        assert cp.tokens is not None
        good, _ = cp.tokens.create("gateway/g1", 600)
        other, _ = cp.tokens.create("gateway/g2", 600)
        async with grpc.aio.insecure_channel(cp.xds_address) as channel:
            call = channel.stream_unary(
                METHOD,
                request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
                response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
            )

            async def send(token: str | None, request_id: str) -> grpc.StatusCode:
                message = als_pb2.StreamAccessLogsMessage()
                message.identifier.node.id = "gateway/g1"
                entry = message.http_logs.log_entry.add()
                entry.common_properties.start_time.GetCurrentTime()
                entry.request.request_id = request_id
                entry.response.response_code.value = 200
                metadata = (("authorization", f"Bearer {token}"),) if token else None
                try:
                    await call(iter([message]), metadata=metadata, timeout=5)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            assert await send(None, "forged-1") == grpc.StatusCode.UNAUTHENTICATED
            assert await send("not-a-token", "forged-2") == grpc.StatusCode.UNAUTHENTICATED
            assert await send(other, "forged-3") == grpc.StatusCode.UNAUTHENTICATED
            assert await send(good, "genuine") == grpc.StatusCode.OK
        assert [r.request_id for r in audit_records(cp)] == ["genuine"]


async def test_a_sidecar_logs_what_it_refuses_itself(tmp_path: Path) -> None:
    """No gateway is running: the sidecar answers 503 itself, and ships that record."""
    write_policy(tmp_path / "policies", free_port(), {"tools": free_port()})
    async with (
        control_plane(tmp_path / "policies", tmp_path / "state") as cp,
        sidecar(cp, tmp_path, "researcher", audit=True) as proxy,
        httpx.AsyncClient(proxy=proxy, timeout=10) as client,
    ):
        refused = await client.get("http://tools.internal/x?k=v")
        assert refused.status_code == 503
        records = await until(lambda: audit_records(cp), what="the sidecar's record")
        [r] = records
        assert (r.gateway, r.agent, r.decision) == (
            "agent/researcher/test",
            "researcher",
            "upstream_error",
        )
        assert (r.host, r.path, r.status) == ("tools.internal", "/x", 503)
        assert "connection_failure" in r.reason


async def test_spool_rotation_with_a_real_envoy_loses_nothing(tmp_path: Path) -> None:
    """The shipper renames the spool and asks Envoy to reopen it; every line still ships once."""
    listen = free_port()
    async with upstream("tools") as up:
        write_policy(tmp_path / "policies", listen, {"tools": up.port})
        async with (
            control_plane(tmp_path / "policies", tmp_path / "state") as cp,
            gateway(cp, tmp_path, name="rot") as gw,
        ):
            spool = tmp_path / "gateway-rot" / "audit-spool.jsonl"
            shipper = SpoolShipper(
                spool, cp.xds_address, "gateway/rot", envoy_admin=gw.admin,
                rotate_bytes=3_000,
            )  # fmt: skip
            shipping = asyncio.create_task(shipper.run())
            ids: list[str] = []
            try:
                for wave in range(4):
                    for i in range(15):
                        r = await via_gateway(listen, "tools.internal", f"/w{wave}/{i}")
                        assert r.status_code == 200
                        ids.append(r.headers["x-request-id"])
                    await until(
                        lambda: {r.request_id for r in audit_records(cp)} >= set(ids),
                        what=f"wave {wave} stored",
                    )
                    await until(spool.exists, what="Envoy reopened the spool")
            finally:
                shipping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await shipping
            stored = [r.request_id for r in audit_records(cp)]
            assert sorted(stored) == sorted(ids)
            # Counted, not told by inode: a freed inode is often reused by the reopened spool.
            assert shipper.rotations >= 1, "the spool should have been rotated"

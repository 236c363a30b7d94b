"""Shadow rules with a real gateway: never enforced, their would-be decisions on every audit
record of the agents they concern, and in the control plane's metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from builders import free_port
from harness import (
    audit_records,
    control_plane,
    gateway,
    until,
    upstream,
    via_gateway,
    write_policy,
)

pytestmark = pytest.mark.e2e

POLICY = """\
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: researcher}
spec:
  agent: researcher
  egress:
    - destination: tools
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: researcher-next}
spec:
  agent: researcher
  mode: shadow
  egress:
    - destination: tools
      paths: [/v2/*]
      rateLimit: {requests: 1, per: 1m}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: writer}
spec:
  agent: writer
  egress:
    - destination: tools
      methods: [GET]
    - destination: other
      mode: shadow
"""


async def test_shadow_rules_are_recorded_never_enforced(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("tools") as tools, upstream("other") as other:
        policies = tmp_path / "policies"
        write_policy(policies, listen, {"tools": tools.port, "other": other.port}, agents={})
        (policies / "agents.yaml").write_text(POLICY)
        async with (
            control_plane(policies, tmp_path / "state") as cp,
            gateway(cp, tmp_path, audit=True) as _,
        ):
            sent = [
                ("researcher", "tools.internal", "/v1/x", 200),  # shadow: not in /v2/*
                ("researcher", "tools.internal", "/v2/a", 200),  # shadow: allowed
                ("researcher", "tools.internal", "/v2/b", 200),  # shadow: over 1/min
                ("writer", "other.internal", "/x", 403),  # the shadow rule is not enforced
                ("writer", "tools.internal", "/y", 200),  # nothing shadow matches: as live
            ]
            ids = []
            for who, host, path, status in sent:
                r = await via_gateway(listen, host, path, agent=who)
                assert r.status_code == status, (who, path, r.text)
                ids.append(r.headers["x-request-id"])
            await until(
                lambda: {r.request_id for r in audit_records(cp)} >= set(ids), what="stored"
            )
            by_id = {r.request_id: r for r in audit_records(cp)}
            got = [(by_id[i].decision, by_id[i].shadow_decision) for i in ids]
            assert got == [
                ("allowed", "denied"),
                ("allowed", "allowed"),
                ("allowed", "rate_limited"),
                ("denied", "allowed"),
                ("allowed", "allowed"),
            ]
            assert by_id[ids[0]].shadow_reason == "egress_denied"
            assert other.hits == []  # never reached: shadow never lets a request through
            text = cp.metrics.exposition().decode()
            for change, decision, n in (
                ("newly_refused", "denied", 1),
                ("newly_refused", "rate_limited", 1),
                ("newly_allowed", "allowed", 1),
                ("same", "allowed", 2),
            ):
                line = f'{{change="{change}",decision="{decision}"}} {n:.1f}'
                assert "meshgate_shadow_decisions_total" + line in text, text
            report = cp.audit_log.verify()  # type: ignore[union-attr]
            assert report.ok, report

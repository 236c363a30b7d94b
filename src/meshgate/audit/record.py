"""One audit record: a narrow row per request, the contract between ingest, stores and queries."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Decision = Literal[
    "allowed", "denied", "rate_limited", "over_budget", "queue_timeout", "upstream_error"
]
DECISIONS: tuple[Decision, ...] = (  # later decisions last: fixtures index this
    "allowed",
    "denied",
    "rate_limited",
    "upstream_error",
    "over_budget",
    "queue_timeout",
)


@dataclass(frozen=True)
class AuditRecord:
    """What happened to one request. `request_id` is unique: stores ignore a second copy."""

    timestamp: dt.datetime  # request start, timezone-aware UTC
    request_id: str
    agent: str
    spiffe_id: str
    destination: str
    host: str
    method: str
    path: str
    status: int
    decision: Decision
    reason: str
    bytes_sent: int  # to the agent (response body)
    bytes_received: int  # from the agent (request body)
    duration_ms: float
    policy_version: str  # the policy commit that allowed or refused it
    gateway: str  # node id of the Envoy that logged it (gateway/<name> or agent/<name>)
    # what the gateway's MCP filter read from a JSON-RPC body ("" for other requests)
    mcp_method: str = ""  # e.g. tools/call, tools/list, initialize
    mcp_tool: str = ""  # params.name of a tools/call
    # what the gateway's pacer read from an LLM call ("" and 0 for other requests)
    model: str = ""  # the model the agent asked for
    tokens_in: int = 0  # as the provider reported them (or reserved, when it reported none)
    tokens_out: int = 0
    cost_micro_usd: int = 0  # at the destination's prices; 0 when it has none
    mcp_args_digest: str = ""  # sha256 of a tool call's RFC 8785 canonical arguments
    # what the policy's shadow rules would have decided (audit.shadow); "" when none apply
    shadow_decision: str = ""
    shadow_reason: str = ""
    # a sub-agent's chain of delegation, `supervisor>web-1`, from its verified certificate
    # ("" for a policy agent; docs/policy.md, "Delegation")
    delegation_chain: str = ""

    @classmethod
    def trusted(cls, timestamp: dt.datetime, values: tuple[Any, ...]) -> AuditRecord:
        """A record from its values in `chain.record_values` order (`timestamp` as UTC
        microseconds first) and its `timestamp`, without the dataclass `__init__` (a frozen
        instance goes through `object.__setattr__` per field). For `audit.ingest`, whose values
        are already typed.

        The tuple is kept (`VALUES_KEY`, outside the fields: equality, `replace` and `asdict`
        ignore it) so the store's append, which needs exactly it, does not rebuild it."""
        record = _new(cls)
        state = record.__dict__
        state.update(zip(_FIELD_NAMES, values, strict=True))
        state["timestamp"] = timestamp
        state[VALUES_KEY] = values
        return record

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["timestamp"] = self.timestamp.astimezone(dt.UTC).isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditRecord:
        fields = dict(data)
        fields["timestamp"] = dt.datetime.fromisoformat(fields["timestamp"]).astimezone(dt.UTC)
        return cls(**fields)


_new = object.__new__
VALUES_KEY = "_values"  # where `trusted` keeps the values it was built from
_FIELD_NAMES = tuple(f.name for f in fields(AuditRecord))

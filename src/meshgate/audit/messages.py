"""One `StreamAccessLogsMessage` -> the values and chain digests of its records. Pure: no I/O.

This is the CPU-heavy part of ingest (protobuf, the record mapping, canonical JSON, SHA-256:
~11 us a record), and it depends on nothing but the message and who sent it, so the control
plane runs it in a worker process (`decode_worker.py`) while its own process only moves bytes
and appends to the store. What crosses the process boundary is plain tuples, bytes and
strings (`marshal`), and no `AuditRecord` is built on either side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

from meshgate.audit.chain import values_digest
from meshgate.audit.ingest import IngestError, entry_values

AGENT, SPIFFE_ID = 2, 3  # positions in `chain.record_values`

# (record values, their digests), in the message's order
Decoded = tuple[list[tuple[Any, ...]], list[bytes]]


@dataclass(frozen=True)
class Refusal:
    """Why a message ends its stream: a gRPC status code name and a message for the client."""

    code: str
    message: str


def decode_message(raw: bytes, node_id: str, agent: str | None) -> Decoded | Refusal:
    """The records of one message from `node_id`, the stream's authenticated node.

    `agent` is set for a sidecar (`agent/<name>/...`): it may log only for that agent, and
    vouches for nothing but its own refusals, so its records get that agent and no SPIFFE ID.
    """
    try:
        message = als_pb2.StreamAccessLogsMessage.FromString(raw)
    except DecodeError:
        return Refusal("INVALID_ARGUMENT", "undecodable access-log message")
    if message.identifier.node.id not in ("", node_id):
        return Refusal("INVALID_ARGUMENT", "one node per access-log stream")
    if message.HasField("tcp_logs") and message.tcp_logs.log_entry:
        return Refusal("INVALID_ARGUMENT", "only HTTP access logs are accepted")
    rows: list[tuple[Any, ...]] = []
    add = rows.append
    for entry in message.http_logs.log_entry:
        try:
            values = entry_values(entry, node_id)
        except (IngestError, ValueError, OverflowError) as exc:
            return Refusal("INVALID_ARGUMENT", f"bad access-log entry: {exc}")
        if agent is not None:
            claimed = values[AGENT]
            if claimed and claimed != agent:
                return Refusal(
                    "PERMISSION_DENIED",
                    f"{node_id} may log only for agent {agent}, not {claimed}",
                )
            values = (*values[:AGENT], agent, "", *values[SPIFFE_ID + 1 :])
        add(values)
    return rows, [values_digest(v) for v in rows]

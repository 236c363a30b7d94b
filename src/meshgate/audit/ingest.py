"""Envoy access-log entries -> audit records. Pure: no I/O.

Two inputs meet here. Envoy's gRPC access logger sends `HTTPAccessLogEntry` protos; the gateway's
spool holds one JSON object per request (keys: `meshgate.xds.access_log.SPOOL_FORMAT`), which the
shipper turns into the same protos (`entry_from_spool`) so the control plane has one path.

Where the audit fields come from in an entry:
- route metadata (`meshgate`: destination, decision, reason): `custom_tags` `meshgate.<key>`;
- the agent header the gateway routed on: dynamic metadata `meshgate.agent`;
- the policy version: the response header `x-meshgate-policy` that the route table adds;
- the verified peer (mTLS): the peer certificate's URI SAN.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as als
from google.protobuf import struct_pb2

from meshgate.audit.record import AuditRecord, Decision
from meshgate.delegation import names
from meshgate.xds.access_log import (
    METADATA_KEY,
    POLICY_HEADER,
    local_refusal,
    route_decision,
)
from meshgate.xds.pacing import LIMITS_DETAILS

TAG_PREFIX = f"{METADATA_KEY}."
MAX_FIELD = 2048  # bound what a logging node can make the store keep per field
# Paths are kept whole: the gateway refuses paths over 8 KiB, and what it refuses is bounded by
# Envoy's 60 KiB request-header limit; this bound only stops a forged stream.
MAX_PATH = 64 * 1024

# Envoy's short response flags -> the ResponseFlags field each sets.
FLAG_FIELDS: dict[str, str] = {
    "LH": "failed_local_healthcheck",
    "UH": "no_healthy_upstream",
    "UT": "upstream_request_timeout",
    "LR": "local_reset",
    "UR": "upstream_remote_reset",
    "UF": "upstream_connection_failure",
    "UC": "upstream_connection_termination",
    "UO": "upstream_overflow",
    "NR": "no_route_found",
    "DI": "delay_injected",
    "FI": "fault_injected",
    "RL": "rate_limited",
    "RLSE": "rate_limit_service_error",
    "DC": "downstream_connection_termination",
    "URX": "upstream_retry_limit_exceeded",
    "SI": "stream_idle_timeout",
    "IH": "invalid_envoy_request_headers",
    "DPE": "downstream_protocol_error",
    "UMSDR": "upstream_max_stream_duration_reached",
    "RFCF": "response_from_cache_filter",
    "NFCF": "no_filter_config_found",
    "DT": "duration_timeout",
    "UPE": "upstream_protocol_error",
    "NC": "no_cluster_found",
    "OM": "overload_manager",
    "DF": "dns_resolution_failure",
    "DR": "downstream_remote_reset",
}
# The upstream could not give an answer (connect failure, reset, timeout, TLS or DNS failure).
UPSTREAM_FAILURE_FIELDS = frozenset(
    FLAG_FIELDS[f] for f in ("UH", "UT", "UR", "UF", "UC", "UO", "URX", "UMSDR", "UPE", "NC", "DF")
)
# a policy agent's name, or a sub-agent's path (`parent/sub/child`, delegation/names.py)
_SPIFFE_AGENT = re.compile(r"^spiffe://[^/]+/agent/(?P<name>[^/]+(/sub/[^/]+)*)$")


# The pacer's refusals, by the response code details it sets (pacing.spec): on an allow route
# they are the decision (the route allowed the request; its pace did not).
PACER_DECISIONS: dict[str, Decision] = {
    "over_budget": "over_budget",
    "queue_timeout": "queue_timeout",
    "model_not_allowed": "denied",
    "max_tokens_exceeded": "denied",
    "llm_body_unreadable": "denied",
    "limit_store_unavailable": "denied",
    "pace_spec_invalid": "denied",
}
# The gateway's global-limits filter (xds.pacing.LIMITS_LUA: the only Lua filter there) by the
# status the pacer, or the filter itself when the pacer is silent, answered with
LIMITS_DECISIONS: dict[int, tuple[Decision, str]] = {
    429: ("rate_limited", "rate_limited"),
    503: ("rate_limited", "limit_store_unavailable"),
}
PACER = "meshgate.pacer"  # xds.access_log.PACER_METADATA
MAX_TOKENS = 1 << 40  # bound what a logging node can make the store add up
MAX_COST = 1 << 50


class IngestError(ValueError):
    """An entry that cannot become a record (the line or message is malformed)."""


def decide(
    route_decision: str, route_reason: str, status: int, flags: set[str], details: str
) -> tuple[Decision, str]:
    """The audit decision and reason from what the route said and what Envoy then did.

    Route metadata is authoritative for refusals (403 denials, 503 credential_unavailable).
    On an allowing route: a rate limiter's 429 is `rate_limited`; a 5xx or an upstream
    failure flag is `upstream_error` (reason: Envoy's response code details); any other status
    the upstream answered (2xx-4xx) is `allowed`. No route at all (Envoy refused the request
    before routing, e.g. a malformed request) counts as denied. A refusal by one of the
    gateway's own filters (path guard, MCP body checks: `access_log.LOCAL_REFUSALS`) is denied
    whatever route had been selected, with its reason.
    """
    refused = local_refusal(details)
    if refused is not None and (route_decision != "denied" or route_reason in ("", "mcp_unparsed")):
        return "denied", refused
    paced = PACER_DECISIONS.get(details)
    if paced is not None and route_decision == "allowed":
        return paced, details
    if details == LIMITS_DETAILS and route_decision == "allowed":  # the global-limits filter
        return LIMITS_DECISIONS.get(status, ("denied", "limit_spec_invalid"))
    if route_decision == "denied":
        return "denied", route_reason or "denied"
    if route_decision == "upstream_error":
        return "upstream_error", route_reason or details
    if "rate_limited" in flags:
        return "rate_limited", "rate_limited"
    if "rate_limit_service_error" in flags:  # a limit failing closed, its store silent
        return "rate_limited", "limit_store_unavailable"
    if flags & UPSTREAM_FAILURE_FIELDS or status >= 500:
        return "upstream_error", details or f"status {status}"
    if route_decision == "allowed":
        return "allowed", details if status == 0 else ""
    return "denied", details or "no_route"


def agent_name(header: str) -> str:
    """The agent's name from what the gateway routed on: a name, or its SPIFFE ID (mTLS)."""
    m = _SPIFFE_AGENT.match(header)
    return m["name"].replace("/sub/", ".") if m else header


def delegation_chain(spiffe_id: str) -> str:
    """`supervisor>web-1` from a sub-agent's verified SPIFFE ID (`.../agent/supervisor/sub/
    web-1`), which the gateway took from its client certificate: nothing the agent sends."""
    if "/sub/" not in spiffe_id:
        return ""
    m = _SPIFFE_AGENT.match(spiffe_id)
    return m["name"].replace("/sub/", ">") if m else ""


def node_chain(node_id: str) -> str:
    """The chain of a sub-agent's own sidecar (`agent/supervisor.web-1/<instance>`, a node id
    its join token was checked against), for what that sidecar refuses itself."""
    if not node_id.startswith("agent/"):
        return ""
    return names.chain_text(node_id.split("/", 2)[1])


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_TIMEDELTA = dt.timedelta
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799  # years 1..9999
_DECISION, _REASON, _DESTINATION, _METHOD, _MCP_METHOD, _MCP_TOOL = (
    TAG_PREFIX + key
    for key in ("decision", "reason", "destination", "method", "mcp_method", "mcp_tool")
)


def record_from_entry(entry: als.HTTPAccessLogEntry, node_id: str) -> AuditRecord:
    """The record of one entry; `test_ingest` pins it to the plain mapping."""
    values = entry_values(entry, node_id)
    # exact, as Timestamp.ToDatetime
    return AuditRecord.trusted(EPOCH + _TIMEDELTA(microseconds=values[0]), values)


def entry_values(entry: als.HTTPAccessLogEntry, node_id: str) -> tuple[Any, ...]:
    """The `chain.record_values` of an entry's record, without building the record (the
    ingest path stores values). Runs once per request, so each sub-message is read once and
    optional ones only when present (a upb field access costs about as much as a Python
    call)."""
    common, request, response = entry.common_properties, entry.request, entry.response
    tags = common.custom_tags
    route_decision = route_reason = destination = method_tag = mcp_method = mcp_tool = ""
    if n_tags := len(tags):
        get = tags.get
        route_decision, route_reason = get(_DECISION, ""), get(_REASON, "")
        destination = get(_DESTINATION, "")
        if n_tags > bool(route_decision) + bool(route_reason) + bool(destination):
            method_tag, mcp_method, mcp_tool = (
                get(_METHOD, ""),
                get(_MCP_METHOD, ""),
                get(_MCP_TOOL, ""),
            )
    flags = (
        {f.name for f, v in common.response_flags.ListFields() if v is True}
        if common.HasField("response_flags")
        else set()
    )
    status = response.response_code.value
    decision, reason = decide(
        route_decision, route_reason, status, flags, response.response_code_details
    )
    agent = model = digest = shadow_decision = shadow_reason = ""
    tokens_in = tokens_out = cost = 0
    if common.HasField("metadata"):
        filter_md = common.metadata.filter_metadata
        meshgate_md = filter_md.get(METADATA_KEY)
        if meshgate_md is not None and (value := meshgate_md.fields.get("agent")) is not None:
            agent = agent_name(value.string_value)
        pacer = filter_md.get(PACER)
        if pacer is not None:
            got = pacer.fields
            model = got["model"].string_value if "model" in got else ""
            digest = got["mcp_args_digest"].string_value if "mcp_args_digest" in got else ""
            tokens_in = _count(got, "tokens_in", MAX_TOKENS)
            tokens_out = _count(got, "tokens_out", MAX_TOKENS)
            cost = _count(got, "cost_micro_usd", MAX_COST)
            if decision == "over_budget" and "budget" in got:
                reason = f"over_budget: {got['budget'].string_value}"
            if "shadow_refused" in got:  # shadow tool rules, read by the pacer (audit.shadow)
                shadow_decision = "denied"
                shadow_reason = got["shadow_refused"].string_value
    spiffe_id = ""
    if common.HasField("tls_properties"):
        for san in common.tls_properties.peer_certificate_properties.subject_alt_name:
            if san.uri:
                spiffe_id = san.uri
                break
    duration = (
        common.duration if common.HasField("duration") else common.time_to_last_downstream_tx_byte
    )
    start = common.start_time
    seconds, nanos = start.seconds, start.nanos
    if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        raise ValueError(f"timestamp {seconds}.{nanos:09d} out of range")  # as ToDatetime
    headers = response.response_headers
    micros = nanos // 1000
    return (  # in `chain.record_values` order: what the store needs
        seconds * 1_000_000 + micros,
        (request.request_id or _synthetic_id(entry, node_id))[:MAX_FIELD],
        agent[:MAX_FIELD],
        spiffe_id[:MAX_FIELD],
        destination[:MAX_FIELD],
        request.authority[:MAX_FIELD],
        (_METHOD_NAMES.get(request.request_method, "") or method_tag)[:MAX_FIELD],
        request.path.split("?", 1)[0][:MAX_PATH],  # query strings can carry secrets
        status,
        decision,
        reason[:MAX_FIELD],
        response.response_body_bytes,
        request.request_body_bytes,
        (duration.seconds * 1_000_000_000 + duration.nanos) / 1e6,  # as Duration.ToNanoseconds
        (headers.get(POLICY_HEADER, "") if len(headers) else "")[:MAX_FIELD],
        node_id,
        mcp_method[:MAX_FIELD],
        mcp_tool[:MAX_FIELD],
        model[:MAX_FIELD],
        tokens_in,
        tokens_out,
        cost,
        digest[:MAX_FIELD],
        # the pacer's shadow tool-rule refusal, if any; audit.shadow decides the rest
        shadow_decision,
        shadow_reason[:MAX_FIELD],
        (delegation_chain(spiffe_id) or node_chain(node_id))[:MAX_FIELD],
    )


def _count(fields: Any, key: str, bound: int) -> int:
    """A non-negative whole number from pacer metadata (a double in a Struct), bounded."""
    value = fields.get(key)
    if value is None:
        return 0
    number = value.number_value
    return int(number) if 0 <= number <= bound else 0


_METHODS: dict[str, int] = {
    name: number for name, number in base_pb2.RequestMethod.items() if name != "METHOD_UNSPECIFIED"
}
_METHOD_NAMES = {number: name for name, number in _METHODS.items()}


def _synthetic_id(entry: als.HTTPAccessLogEntry, node_id: str) -> str:
    """A stable id for an entry without x-request-id, so a resend still dedupes."""
    digest = hashlib.sha256(node_id.encode() + entry.SerializeToString(deterministic=True))
    return "noid-" + digest.hexdigest()[:32]


def entry_from_spool(line: str | bytes) -> als.HTTPAccessLogEntry:
    """One spool line as the entry Envoy's gRPC logger would have sent for it."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise IngestError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise IngestError("not a JSON object")
    try:
        return _entry(data)
    except (TypeError, ValueError, OverflowError) as exc:
        raise IngestError(f"bad field: {exc}") from None


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None or value == "-":  # Envoy renders an absent value as null (or "-")
        return ""
    return str(value)


def _int(data: dict[str, Any], key: str) -> int:
    text = _text(data, key)
    return int(text) if text else 0


def _entry(data: dict[str, Any]) -> als.HTTPAccessLogEntry:
    entry = als.HTTPAccessLogEntry()
    common, request, response = entry.common_properties, entry.request, entry.response
    start = _text(data, "start")
    if not start:
        raise ValueError("no start time")
    start_ns = round(float(start) * 1e6) * 1000
    common.start_time.FromNanoseconds(start_ns)
    duration_us = _int(data, "duration_us")
    common.duration.FromMicroseconds(duration_us)
    common.time_to_last_downstream_tx_byte.FromMicroseconds(duration_us)
    route = data.get("route")  # the route's name: what it decided; null when none matched
    if route is not None and not isinstance(route, str):
        raise ValueError("route is not a route name")
    decided = route_decision(route) if route else None
    if decided is not None:
        for key, value in (
            ("destination", decided.destination),
            ("decision", decided.decision),
            ("reason", decided.reason),
        ):
            if value:
                common.custom_tags[TAG_PREFIX + key] = value
    # an allow route names its agent; otherwise the agent header the gateway decided on
    if agent := (decided.agent if decided else "") or _text(data, "agent"):
        common.metadata.filter_metadata[METADATA_KEY].CopyFrom(
            struct_pb2.Struct(fields={"agent": struct_pb2.Value(string_value=agent)})
        )
    if spiffe := _text(data, "spiffe_id"):
        san = common.tls_properties.peer_certificate_properties.subject_alt_name.add()
        san.uri = spiffe
    for flag in _text(data, "flags").split(","):
        if flag in FLAG_FIELDS:
            setattr(common.response_flags, FLAG_FIELDS[flag], True)
    request.request_id = _text(data, "request_id")
    request.authority = _text(data, "authority")
    request.path = _text(data, "path")
    method = _text(data, "method")
    if method in _METHODS:
        request.request_method = _METHODS[method]
    elif method:  # not in Envoy's enum (e.g. PROPFIND): keep it as a tag
        common.custom_tags[TAG_PREFIX + "method"] = method
    for key in ("mcp_method", "mcp_tool"):
        if value := _text(data, key):
            common.custom_tags[TAG_PREFIX + key] = value
    pacer: dict[str, Any] = {}
    for key in ("model", "budget", "mcp_args_digest", "shadow_refused"):
        if value := _text(data, key):
            pacer[key] = value
    for key in ("tokens_in", "tokens_out", "cost_micro_usd"):
        if text := _text(data, key):
            pacer[key] = float(text)  # Envoy writes a Struct number; bounded when read
    if pacer:
        common.metadata.filter_metadata[PACER].update(pacer)
    request.request_body_bytes = _int(data, "bytes_received")
    response.response_code.value = _int(data, "status")
    response.response_body_bytes = _int(data, "bytes_sent")
    response.response_code_details = _text(data, "details")
    if version := _text(data, "policy_version"):
        response.response_headers[POLICY_HEADER] = version
    return entry

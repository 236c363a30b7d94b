"""Pure ingest: spool lines and ALS entries -> audit records, and the decision mapping."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as als
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.audit.chain import canonical, record_values
from meshgate.audit.ingest import (
    FLAG_FIELDS,
    MAX_PATH,
    PACER_DECISIONS,
    IngestError,
    _synthetic_id,
    agent_name,
    decide,
    entry_from_spool,
    record_from_entry,
)
from meshgate.audit.record import VALUES_KEY, AuditRecord
from meshgate.xds.access_log import SPOOL_FORMAT, RouteDecision, route_decision


def line(**overrides: Any) -> str:
    """A spool line as the gateway Envoy writes it (JSON format of SPOOL_FORMAT)."""
    fields: dict[str, Any] = {
        "start": "1795619752.601567",
        "request_id": "f988df20-a7b8-4e70-b976-5bd3a51cc1e3",
        "agent": "researcher",
        "spiffe_id": None,
        "route": "allow/researcher/search/0/0",
        "policy_version": "abc123",
        "authority": "search.internal",
        "method": "GET",
        "path": "/v1/search?q=secret",
        "status": 200,
        "flags": "-",
        "details": "via_upstream",
        "bytes_received": 0,
        "bytes_sent": 42,
        "duration_us": 1500,
        "mcp_method": None,
        "mcp_tool": None,
        "model": None,
        "tokens_in": None,
        "tokens_out": None,
        "cost_micro_usd": None,
        "budget": None,
        "mcp_args_digest": None,
        "shadow_refused": None,
    }
    assert set(fields) == set(SPOOL_FORMAT)  # the test speaks the format the gateway writes
    fields.update(overrides)
    return json.dumps(fields)


ROUTES = {  # (decision, reason) -> the name of a gateway route that decides that
    ("allowed", ""): "allow/researcher/{dest}/0/0",
    ("denied", "egress_denied"): "deny/{dest}",
    ("denied", "tool_denied"): "deny-tool/{dest}",
    ("denied", "mcp_unparsed"): "mcp-unparsed/{dest}",
    ("denied", "unknown_destination"): "unknown-destination",
    ("upstream_error", "credential_unavailable"): "no-credential/{dest}",
}


def record(**overrides: Any) -> Any:
    """`destination`, `decision`, `reason` overrides pick the route (by name) that decided."""
    key = (overrides.pop("decision", "allowed"), overrides.pop("reason", ""))
    dest = overrides.pop("destination", "search")
    overrides.setdefault("route", ROUTES[key].format(dest=dest))
    return record_from_entry(entry_from_spool(line(**overrides)), "gateway/g1")


def test_allowed_line_becomes_a_full_record() -> None:
    r = record()
    assert r.timestamp == dt.datetime(2026, 11, 25, 15, 15, 52, 601567, tzinfo=dt.UTC)
    assert r.request_id == "f988df20-a7b8-4e70-b976-5bd3a51cc1e3"
    assert (r.agent, r.spiffe_id, r.destination, r.host) == (
        "researcher",
        "",
        "search",
        "search.internal",
    )
    assert (r.method, r.path, r.status) == ("GET", "/v1/search", 200)  # no query string
    assert (r.decision, r.reason, r.policy_version, r.gateway) == (
        "allowed",
        "",
        "abc123",
        "gateway/g1",
    )
    assert (r.bytes_sent, r.bytes_received, r.duration_ms) == (42, 0, 1.5)


def test_mtls_identity_names_the_agent_and_the_spiffe_id() -> None:
    spiffe = "spiffe://agents.test/agent/researcher"
    r = record(agent=spiffe, spiffe_id=spiffe)
    assert (r.agent, r.spiffe_id) == ("researcher", spiffe)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"decision": "denied", "reason": "egress_denied", "status": 403},
            ("denied", "egress_denied"),
        ),
        (
            {
                "decision": "denied",
                "reason": "unknown_destination",
                "status": 403,
                "destination": "",
            },
            ("denied", "unknown_destination"),
        ),
        (
            {"decision": "upstream_error", "reason": "credential_unavailable", "status": 503},
            ("upstream_error", "credential_unavailable"),
        ),
        (
            {"status": 429, "flags": "RL", "details": "local_rate_limited"},
            ("rate_limited", "rate_limited"),
        ),
        ({"status": 429}, ("allowed", "")),  # the upstream's own 429 is its answer
        (  # the pacer's refusals are decisions of their own, naming the budget
            {"status": 429, "details": "over_budget", "budget": "agent/coder/daily"},
            ("over_budget", "over_budget: agent/coder/daily"),
        ),
        ({"status": 503, "details": "queue_timeout"}, ("queue_timeout", "queue_timeout")),
        ({"status": 403, "details": "model_not_allowed"}, ("denied", "model_not_allowed")),
        (  # a global limit failing closed while its store is down
            {"status": 503, "flags": "RLSE", "details": "rate_limiter_error"},
            ("rate_limited", "limit_store_unavailable"),
        ),
        ({"status": 404}, ("allowed", "")),
        (
            {"status": 503, "flags": "UF", "details": "upstream_reset_before_response_started{x}"},
            ("upstream_error", "upstream_reset_before_response_started{x}"),
        ),
        ({"status": 502, "details": "via_upstream"}, ("upstream_error", "via_upstream")),
        (
            {"status": 504, "flags": "UT", "details": "upstream_response_timeout"},
            ("upstream_error", "upstream_response_timeout"),
        ),
        (
            {"status": 400, "route": None, "details": "http1.codec_error"},
            ("denied", "http1.codec_error"),
        ),
    ],
)
def test_decision_mapping(overrides: dict[str, Any], expected: tuple[str, str]) -> None:
    r = record(**overrides)
    assert (r.decision, r.reason) == expected


def test_unusual_method_and_missing_request_id_still_make_stable_records() -> None:
    a = record(method="PROPFIND", request_id=None)
    b = record(method="PROPFIND", request_id=None)
    assert a.method == "PROPFIND"
    assert a.request_id.startswith("noid-") and a.request_id == b.request_id


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1, 2]",
        line(start=None),
        line(status="two hundred"),
        line(start="soon"),
        line(route={"decision": "allowed"}),
    ],
)
def test_malformed_lines_are_one_error(text: str) -> None:
    with pytest.raises(IngestError):
        entry_from_spool(text)


def test_fields_are_bounded_but_paths_are_whole() -> None:
    # a refusal: the agent comes from the header (an allow route would name it)
    tail = "/../../admin"
    r = record(
        path="/" + "a" * 10_000 + tail,
        agent="x" * 10_000,
        decision="denied",
        reason="egress_denied",
    )
    assert len(r.agent) == 2048
    assert r.path.endswith(tail) and len(r.path) == 10_001 + len(tail)  # never cut
    assert len(record(path="/" + "a" * 100_000).path) == MAX_PATH  # only a forged stream


def test_mcp_method_and_tool_are_recorded() -> None:
    r = record(mcp_method="tools/call", mcp_tool="read_file")
    assert (r.mcp_method, r.mcp_tool) == ("tools/call", "read_file")
    assert record().mcp_method == "" and record().mcp_tool == ""
    denied = record(
        decision="denied", reason="tool_denied", mcp_method="tools/call", mcp_tool="write_file"
    )
    assert (denied.decision, denied.reason, denied.mcp_tool) == (
        "denied",
        "tool_denied",
        "write_file",
    )


@pytest.mark.parametrize(
    ("route", "status", "details", "reason"),
    [
        # the gateway's own filters refuse before the (allow) route is used
        ("allow/researcher/docs/0/0", 414, "rbac_access_denied_matched_policy[path-too-long]",
         "path_too_long"),
        ("allow/researcher/docs/0/0", 400,
         "rbac_access_denied_matched_policy[path-not-canonical]", "path_not_canonical"),
        (None, 400, "path_normalization_failed", "path_not_canonical"),
        ("allow/researcher/mcp/0/2", 403, "rbac_access_denied_matched_policy[mcp-body-unparsed]",
         "mcp_unparsed: a body on a request routed as body-less"),
        ("mcp-unparsed/mcp", 413, "request_payload_too_large", "body_too_large"),
        ("mcp-unparsed/mcp", 403, "mcp_parse_error", "mcp_unparsed: mcp_parse_error"),
        ("mcp-unparsed/mcp", 403, "direct_response", "mcp_unparsed"),
        ("deny-tool/mcp", 403, "direct_response", "tool_denied"),
    ],
)  # fmt: skip
def test_gateway_filter_refusals_are_denied_with_their_reason(
    route: str | None, status: int, details: str, reason: str
) -> None:
    r = record_from_entry(
        entry_from_spool(line(route=route, status=status, details=details)), "gateway/g1"
    )
    assert (r.decision, r.reason) == ("denied", reason)


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40))
def test_agent_name_is_the_name_or_the_spiffe_path_tail(name: str) -> None:
    assert agent_name(name) == name or name.startswith("spiffe://")
    assert agent_name(f"spiffe://td/agent/{name}") in (name, f"spiffe://td/agent/{name}")


def test_decide_is_total_over_route_decisions() -> None:
    for route in ("allowed", "denied", "upstream_error", ""):
        for status in (0, 200, 403, 429, 503):
            for flags in (set(), {"rate_limited"}, {"upstream_connection_failure"}):
                decision, _ = decide(route, "", status, flags, "")
                assert decision in ("allowed", "denied", "rate_limited", "upstream_error")
    for details, paced in PACER_DECISIONS.items():  # only an allow route's request is paced
        assert decide("allowed", "", 429, set(), details)[0] == paced
        assert decide("denied", "egress_denied", 403, set(), details)[0] == "denied"


def test_llm_calls_carry_model_tokens_and_cost() -> None:
    r = record(model="gpt-4o-mini", tokens_in=12, tokens_out=41, cost_micro_usd=94.0)
    assert (r.model, r.tokens_in, r.tokens_out, r.cost_micro_usd) == ("gpt-4o-mini", 12, 41, 94)
    # a logging node cannot make the store count absurd amounts
    assert record(tokens_in=-5, cost_micro_usd=1e300).tokens_in == 0
    assert record(tokens_in=-5, cost_micro_usd=1e300).cost_micro_usd == 0


def test_a_shadow_tool_refusal_read_by_the_pacer_is_kept() -> None:
    refused = "argument_refused: argument repo does not match ^acme/"
    r = record(shadow_refused=refused)
    assert (r.decision, r.shadow_decision, r.shadow_reason) == ("allowed", "denied", refused)
    assert (record().shadow_decision, record().shadow_reason) == ("", "")


def test_route_names_say_what_each_route_decided() -> None:
    assert route_decision("allow/coder/github/2/connect") == RouteDecision(
        "github", "allowed", agent="coder"
    )
    assert route_decision("deny-connect/github") == RouteDecision(
        "github", "denied", "egress_denied"
    )
    assert route_decision("unknown-destination") == RouteDecision(
        "", "denied", "unknown_destination"
    )
    assert route_decision("no-credential/llm") == RouteDecision(
        "llm", "upstream_error", "credential_unavailable"
    )
    assert route_decision("something/else/entirely") is None
    # a route name that is not meshgate's decides nothing: as if no route had matched
    assert record(route="someone-elses-route") == record(route=None)


# -- the fast decoder against the plain mapping -----------------------------------------------


def plain_record(entry: als.HTTPAccessLogEntry, node_id: str) -> AuditRecord:
    """`record_from_entry` written the obvious way (what it was before it was made fast):
    the oracle the optimised one must match on every entry, forged ones included."""
    common, request, response = entry.common_properties, entry.request, entry.response
    tags = common.custom_tags
    flags = {f.name for f, v in common.response_flags.ListFields() if v is True}
    status = response.response_code.value
    decision, reason = decide(
        tags.get("meshgate.decision", ""),
        tags.get("meshgate.reason", ""),
        status,
        flags,
        response.response_code_details,
    )
    md = common.metadata.filter_metadata.get("meshgate")
    agent = md.fields["agent"].string_value if md is not None and "agent" in md.fields else ""
    peer = common.tls_properties.peer_certificate_properties.subject_alt_name
    duration = (
        common.duration if common.HasField("duration") else common.time_to_last_downstream_tx_byte
    )
    method = base_pb2.RequestMethod.Name(request.request_method)
    method = "" if method == "METHOD_UNSPECIFIED" else method

    def clip(text: str) -> str:
        return text[:2048]

    return AuditRecord(
        timestamp=common.start_time.ToDatetime(dt.UTC),
        request_id=clip(request.request_id or _synthetic_id(entry, node_id)),
        agent=clip(agent_name(agent)),
        spiffe_id=clip(next((san.uri for san in peer if san.uri), "")),
        destination=clip(tags.get("meshgate.destination", "")),
        host=clip(request.authority),
        method=clip(method or tags.get("meshgate.method", "")),
        path=request.path.split("?", 1)[0][:MAX_PATH],
        status=status,
        decision=decision,
        reason=clip(reason),
        bytes_sent=response.response_body_bytes,
        bytes_received=request.request_body_bytes,
        duration_ms=duration.ToNanoseconds() / 1e6,
        policy_version=clip(response.response_headers.get("x-meshgate-policy", "")),
        gateway=node_id,
        mcp_method=clip(tags.get("meshgate.mcp_method", "")),
        mcp_tool=clip(tags.get("meshgate.mcp_tool", "")),
    )


TAG_KEYS = ("decision", "reason", "destination", "method", "mcp_method", "mcp_tool", "other")
short_text = st.text(max_size=5) | st.sampled_from(["", "allowed", "denied", "x" * 3000])


@st.composite
def entries(draw: st.DrawFn) -> als.HTTPAccessLogEntry:
    """Entries as the shipper makes them and as a forged stream could: any tags (empty values
    too), flags, metadata, SANs, headers, methods, and timestamps at and past the edges."""
    entry = als.HTTPAccessLogEntry()
    common = entry.common_properties
    for key in draw(st.lists(st.sampled_from(TAG_KEYS), max_size=7, unique=True)):
        common.custom_tags[f"meshgate.{key}"] = draw(short_text)
    for flag in draw(st.lists(st.sampled_from(sorted(FLAG_FIELDS.values())), max_size=3)):
        setattr(common.response_flags, flag, True)
    if draw(st.booleans()):
        common.response_flags.SetInParent()  # present, every flag false
    if draw(st.booleans()):
        fields = {"agent": draw(st.sampled_from(["a", "spiffe://td/agent/b", "", "y" * 3000]))}
        common.metadata.filter_metadata[draw(st.sampled_from(["meshgate", "other"]))].update(
            fields if draw(st.booleans()) else {"not-agent": "x"}
        )
    for uri in draw(st.lists(st.sampled_from(["", "spiffe://td/agent/c", "z" * 3000]), max_size=3)):
        san = common.tls_properties.peer_certificate_properties.subject_alt_name.add()
        if uri:
            san.uri = uri
        else:
            san.dns = "host.example"
    common.start_time.seconds = draw(
        st.sampled_from([0, 1_795_619_752, -62_135_596_800, 253_402_300_799])
        | st.integers(-(2**40), 2**40)
    )
    common.start_time.nanos = draw(st.sampled_from([0, 999_999_999, 601_567_123, -1, 10**9]))
    if draw(st.booleans()):
        common.duration.FromNanoseconds(draw(st.integers(-(10**12), 10**12)))
    else:
        common.time_to_last_downstream_tx_byte.FromMicroseconds(draw(st.integers(0, 10**9)))
    request, response = entry.request, entry.response
    request.request_id = draw(short_text)
    request.authority = draw(short_text)
    request.path = draw(st.sampled_from(["", "/a?q=secret", "/" + "p" * 70_000, "?only"]))
    request.request_method = draw(st.sampled_from(list(base_pb2.RequestMethod.values())))
    request.request_body_bytes = draw(st.integers(0, 2**40))
    response.response_code.value = draw(st.sampled_from([0, 200, 403, 429, 503]))
    response.response_body_bytes = draw(st.integers(0, 2**40))
    response.response_code_details = draw(
        st.sampled_from(["", "via_upstream", "mcp_parse_error", "request_payload_too_large"])
    )
    for name in draw(st.lists(st.sampled_from(["x-meshgate-policy", "other"]), unique=True)):
        response.response_headers[name] = draw(short_text)
    return entry


def outcome(decode: Any, entry: als.HTTPAccessLogEntry) -> Any:
    try:
        return decode(entry, "gateway/g1")
    except (ValueError, OverflowError):  # what the access-log service refuses a stream for
        return "refused"


@settings(max_examples=400, deadline=None)
@given(entries())
def test_the_fast_decoder_equals_the_plain_mapping(entry: als.HTTPAccessLogEntry) -> None:
    fast, plain = outcome(record_from_entry, entry), outcome(plain_record, entry)
    assert fast == plain
    if isinstance(fast, AuditRecord):  # the values it keeps for the store are its own
        assert VALUES_KEY in fast.__dict__ and VALUES_KEY not in plain.__dict__
        assert record_values(fast) == record_values(plain)
        assert [type(v) for v in record_values(fast)] == [type(v) for v in record_values(plain)]
        assert canonical(fast) == canonical(plain)


def test_a_replaced_record_does_not_keep_the_values_it_was_built_from() -> None:
    """A record rewritten with `replace` (as a sidecar's records once were): the store must see
    the new fields, not the values the decoder kept."""
    record = record_from_entry(entry_from_spool(line()), "agent/researcher/s1")
    changed = replace(record, agent="researcher", spiffe_id="")
    assert VALUES_KEY not in changed.__dict__
    assert record_values(changed)[2:4] == ("researcher", "")
    assert record_values(changed) == record_values(AuditRecord(**changed.__dict__))

"""The pacer's MCP part: strict reading, header checks, argument rules, MCP-shaped refusals,
tools/list filtering (JSON and SSE), the audit fields; and the same over the ext_proc stream."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import zlib
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from test_ext_proc import Stream, http_headers, pacer_metadata

from meshgate.mcp import decision
from meshgate.mcp.canonical import digest
from meshgate.mcp.decision import RequestFacts, ToolGrant, ToolPolicy
from meshgate.pacer import mcp
from meshgate.pacer.ext_proc import MCP_LIST_MODE, MCP_MODE
from meshgate.pacer.service import Pacer
from meshgate.pacing import spec
from meshgate.policy.model import ArgumentRule, ToolRule

CREATE = ToolRule(
    "create_issue",
    (ArgumentRule("repo", pattern="^acme/[a-z]+$"), ArgumentRule("title", max_length=20)),
    ("repo", "title"),
)
POLICY = ToolPolicy(
    "coder",
    "issues",
    (
        ToolGrant(
            "rule 1 of agent coder",
            ("list_issues", "create_issue"),
            (CREATE,),
            paths=("/mcp",),
        ),
    ),
)
FACTS = RequestFacts("POST", "/mcp")


def call(name: str, arguments: dict[str, Any], ident: int | str = 3) -> bytes:
    body = {"jsonrpc": "2.0", "id": ident, "method": "tools/call"}
    body["params"] = {"name": name, "arguments": arguments}
    return json.dumps(body).encode()


def check(body: bytes, headers: tuple[tuple[str, str], ...] = (), refuse: bool = False) -> Any:
    return mcp.check(POLICY, refuse, FACTS, headers, body)


def answer(checked: mcp.Checked) -> dict[str, Any]:
    assert checked.refusal is not None
    return json.loads(checked.refusal.body)  # type: ignore[no-any-return]


def test_an_allowed_call_is_forwarded_with_its_digest() -> None:
    args = {"repo": "acme/web", "title": "fix"}
    got = check(call("create_issue", args))
    assert got.refusal is None
    assert got.audit() == {
        "mcp_method": "tools/call",
        "mcp_tool": "create_issue",
        "mcp_args_digest": digest(args),
    }


def test_refused_arguments_are_a_tool_result_naming_tool_rule_and_remedy() -> None:
    got = check(call("create_issue", {"repo": "evil/web", "title": "secret-title"}))
    assert got.refusal is not None
    assert got.refusal.status.code == 200 and got.refusal.details == spec.MCP_ARGUMENT_REFUSED
    body = answer(got)
    assert body["id"] == 3 and body["result"]["isError"] is True
    assert "resultType" not in body["result"]  # 2025-06-18: no such member
    text = body["result"]["content"][0]["text"]
    assert 'tool "create_issue": argument "repo" must match' in text
    assert "rule 1 of agent coder" in text and "evil" not in text
    assert got.audit()["mcp_tool"] == "create_issue"  # refused calls are recorded too


def test_a_tool_no_rule_names_is_a_tool_result_listing_the_allowed_tools() -> None:
    got = check(call("delete_repo", {}, ident="x"))
    assert got.refusal is not None and got.refusal.details == spec.MCP_TOOL_DENIED
    body = answer(got)
    assert body["id"] == "x"
    assert "create_issue, list_issues" in body["result"]["content"][0]["text"]


def test_the_refusal_route_never_forwards_even_what_the_rules_would_allow() -> None:
    got = check(call("list_issues", {}), refuse=True)
    assert got.refusal is not None and got.refusal.details == spec.MCP_TOOL_DENIED
    assert 'tool "list_issues" is not allowed' in answer(got)["result"]["content"][0]["text"]
    listing = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
    assert check(listing, refuse=True).refusal is not None


def test_unreadable_bodies_are_json_rpc_errors() -> None:
    for body in (b"[" + call("list_issues", {}) + b"]", b"{", call("a", {})[:-1] + b',"id":4}'):
        got = check(body)
        assert got.refusal is not None and got.refusal.status.code == 400
        assert got.refusal.details == spec.MCP_BODY_INVALID
        assert answer(got)["error"]["code"] in (-32700, -32600)
        assert answer(got)["id"] is None


def test_routing_headers_must_match_the_body() -> None:
    body = call("list_issues", {})
    modern = (("mcp-protocol-version", "2026-07-28"),)
    assert check(body, (("mcp-method", "tools/call"), ("mcp-name", "list_issues"))).refusal is None
    b64 = "=?base64?bGlzdF9pc3N1ZXM=?="  # list_issues
    assert check(body, (("Mcp-Method", "tools/call"), ("Mcp-Name", b64))).refusal is None
    for headers in (
        (("mcp-method", "tools/list"),),
        (("mcp-method", "tools/call"), ("mcp-name", "create_issue")),
        (("mcp-method", "tools/call"),),  # the name is required with the method
        (("mcp-name", "other"),),
        (("mcp-method", "tools/call"), ("mcp-method", "tools/call"), ("mcp-name", "x")),
        (("mcp-method", "tools/call"), ("mcp-name", "=?base64?!!?=")),
    ):
        got = check(body, headers + modern)
        assert got.refusal is not None and got.refusal.details == spec.MCP_HEADER_MISMATCH
        assert answer(got)["error"]["code"] == mcp.HEADER_MISMATCH and answer(got)["id"] == 3
    # the 2026-07-28 revision's results say their type
    refused = check(call("nope", {}), (("mcp-method", "tools/call"), ("mcp-name", "nope"), *modern))
    assert answer(refused)["result"]["resultType"] == "complete"


TOOLS = {
    "jsonrpc": "2.0",
    "id": 1,
    "result": {"tools": [{"name": n} for n in ("create_issue", "delete_repo", "list_issues")]},
}


def test_tools_list_answers_are_filtered_in_json_and_sse() -> None:
    got = mcp.filter_answer(POLICY, FACTS, 1, "application/json", json.dumps(TOOLS).encode())
    assert [t["name"] for t in json.loads(got)["result"]["tools"]] == [
        "create_issue",
        "list_issues",
    ]
    note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"tools": []}}
    sse = (
        f"event: message\ndata: {json.dumps(note)}\n\n"
        f"id: 7\nevent: message\ndata: {json.dumps(TOOLS)}\n\n"
    ).encode()
    out = mcp.filter_answer(POLICY, FACTS, 1, "text/event-stream; charset=utf-8", sse).decode()
    events = [e for e in out.split("\n\n") if e]
    assert events[0] == f"event: message\ndata: {json.dumps(note)}"
    assert events[1].startswith("id: 7\nevent: message\ndata: ")
    data = json.loads(events[1].split("data: ", 1)[1])
    assert [t["name"] for t in data["result"]["tools"]] == ["create_issue", "list_issues"]
    # an answer it cannot read is not shown
    bad = mcp.filter_answer(POLICY, FACTS, 1, "application/json", b'{"jsonrpc": "2.0", "id": 1,')
    assert json.loads(bad)["error"]["code"] == -32603


# -- over the ext_proc stream ----------------------------------------------------------------


def pace(refuse: bool = False) -> spec.PaceSpec:
    return spec.PaceSpec("coder", "issues", mcp=decision.encode(POLICY), mcp_refuse=refuse)


def test_the_pace_spec_carries_the_tool_policy() -> None:
    for p in (pace(), pace(True)):
        assert spec.decode(spec.encode(p)) == p
    assert spec.decode(spec.encode(spec.PaceSpec("a", "d"))).mcp is None
    # compressed: gRPC metadata is bounded, and rules repeat their keys for every tool
    many = ToolPolicy(
        "coder",
        "issues",
        (ToolGrant("rule 1 of agent coder", tuple(f"tool_{i}" for i in range(300))),),
    )
    text = spec.encode(spec.PaceSpec("coder", "issues", mcp=decision.encode(many)))
    assert len(text) < len(decision.encode(many)) / 3
    assert spec.decode(text).mcp == decision.encode(many)
    bomb = base64.b64encode(zlib.compress(b" " * (spec.MAX_MCP_TEXT + 1))).decode()
    for bad in (
        {"mcpRefuse": True},  # a refusal route without the rules to explain it
        {"mcpz": "not base64!"},
        {"mcpz": base64.b64encode(b"not zlib").decode()},
        {"mcpz": bomb},
    ):
        with pytest.raises(ValueError):
            spec.decode(json.dumps({"agent": "a", "destination": "d", **bad}))


async def headers(s: Stream, method: str | None = None) -> ep.ProcessingResponse:
    values = {":method": "POST", ":path": "/mcp", "x-request-id": "r", "content-length": "9"}
    request = ep.ProcessingRequest(request_headers=http_headers(values))
    if method is not None:
        envoy = struct_pb2.Struct()
        envoy.update({"method": method})
        request.metadata_context.filter_metadata["envoy.filters.http.mcp"].CopyFrom(envoy)
    await s.send(request)
    return await s.recv()


async def test_stream_checks_the_body_and_answers_refusals(channel: grpc.aio.Channel) -> None:
    s = Stream(channel, pace())
    r = await headers(s, "tools/call")
    assert r.mode_override == MCP_MODE  # the whole body, no response body
    await s.send(
        ep.ProcessingRequest(
            request_body=ep.HttpBody(body=call("create_issue", {"repo": "x"}), end_of_stream=True)
        )
    )
    refused = await s.recv()
    assert refused.immediate_response.status.code == 200
    assert json.loads(refused.immediate_response.body)["result"]["isError"] is True
    assert pacer_metadata(refused)["mcp_tool"] == "create_issue"

    s = Stream(channel, pace())
    await headers(s, "tools/call")
    args = {"repo": "acme/web", "title": "t"}
    body = ep.HttpBody(body=call("create_issue", args), end_of_stream=True)
    await s.send(ep.ProcessingRequest(request_body=body))
    allowed = await s.recv()
    assert allowed.HasField("request_body")
    assert pacer_metadata(allowed)["mcp_args_digest"] == digest(args)


async def test_stream_filters_a_tools_list_answer(channel: grpc.aio.Channel) -> None:
    s = Stream(channel, pace())
    asked = await headers(s, "tools/list")
    assert asked.mode_override == MCP_LIST_MODE
    # the answer must come back readable
    assert list(asked.request_headers.response.header_mutation.remove_headers) == [
        "accept-encoding"
    ]
    listing = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
    await s.send(ep.ProcessingRequest(request_body=ep.HttpBody(body=listing, end_of_stream=True)))
    assert (await s.recv()).HasField("request_body")
    status = {":status": "200", "content-type": "application/json"}
    await s.send(ep.ProcessingRequest(response_headers=http_headers(status)))
    assert (await s.recv()).HasField("response_headers")
    body = ep.HttpBody(body=json.dumps(TOOLS).encode(), end_of_stream=True)
    await s.send(ep.ProcessingRequest(response_body=body))
    r = await s.recv()
    mutated = json.loads(r.response_body.response.body_mutation.body)
    assert [t["name"] for t in mutated["result"]["tools"]] == ["create_issue", "list_issues"]
    lengths = [h.header.raw_value for h in r.response_body.response.header_mutation.set_headers]
    assert lengths == [str(len(r.response_body.response.body_mutation.body)).encode()]

    # Envoy's parser read another method: the answer was not asked for, so it is refused
    s = Stream(channel, pace())
    assert (await headers(s, "initialize")).mode_override == MCP_MODE
    await s.send(ep.ProcessingRequest(request_body=ep.HttpBody(body=listing, end_of_stream=True)))
    assert (await s.recv()).immediate_response.status.code == 400


async def test_a_capped_tool_route_holds_its_slot_to_the_response_end(
    channel: grpc.aio.Channel, pacer: Pacer
) -> None:
    capped = spec.PaceSpec(
        "coder",
        "issues",
        concurrency=(spec.ConcurrencySpec("issues", 1, 1000),),
        mcp=decision.encode(POLICY),
    )
    s = Stream(channel, capped)
    r = await headers(s, "tools/call")
    assert r.mode_override.response_trailer_mode == MCP_MODE.SEND
    body = ep.HttpBody(body=call("list_issues", {}), end_of_stream=True)
    await s.send(ep.ProcessingRequest(request_body=body))
    assert (await s.recv()).HasField("request_body")
    assert pacer.limiter.in_flight("issues") == 1  # held while the answer streams
    await s.send(ep.ProcessingRequest(response_headers=http_headers({":status": "200"})))
    await s.recv()
    await s.send(ep.ProcessingRequest(response_trailers=ep.HttpTrailers()))
    await s.recv()
    await s.end()
    deadline = asyncio.get_running_loop().time() + 5
    while pacer.limiter.in_flight("issues") and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert pacer.limiter.in_flight("issues") == 0


def test_every_response_on_a_tools_list_stream_is_filtered_whatever_its_id() -> None:
    other_id = {**TOOLS, "id": "1"}
    sse = f"data: {json.dumps(other_id)}\n\ndata: not json\n\n".encode()
    events = mcp.filter_answer(POLICY, FACTS, 1, "text/event-stream", sse).decode().split("\n\n")
    first = json.loads(events[0].removeprefix("data: "))
    assert [t["name"] for t in first["result"]["tools"]] == ["create_issue", "list_issues"]
    assert json.loads(events[1].removeprefix("data: "))["error"]["code"] == -32603


async def test_a_compressed_tools_list_answer_is_replaced_not_shown(
    channel: grpc.aio.Channel,
) -> None:
    s = Stream(channel, pace())
    await headers(s, "tools/list")
    listing = json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}).encode()
    await s.send(ep.ProcessingRequest(request_body=ep.HttpBody(body=listing, end_of_stream=True)))
    await s.recv()
    status = {":status": "200", "content-type": "application/json", "content-encoding": "gzip"}
    await s.send(ep.ProcessingRequest(response_headers=http_headers(status)))
    await s.recv()
    gz = ep.HttpBody(body=gzip.compress(json.dumps(TOOLS).encode()), end_of_stream=True)
    await s.send(ep.ProcessingRequest(response_body=gz))
    common = (await s.recv()).response_body.response
    assert json.loads(common.body_mutation.body)["error"]["code"] == -32603
    assert json.loads(common.body_mutation.body)["id"] == 5
    assert list(common.header_mutation.remove_headers) == ["content-encoding"]

"""One MCP JSON-RPC message per body, checked as strictly as the official SDK reads it."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp.types import (
    CallToolRequestParams,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
)

from meshgate.mcp.jsonrpc import Message, parse_message
from meshgate.mcp.strictjson import Refusal


def parsed(body: bytes | dict[str, Any]) -> Message:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    got = parse_message(raw)
    assert isinstance(got, Message), got
    return got


def refusal(body: bytes | dict[str, Any] | list[Any]) -> Refusal:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got = parse_message(raw)
    assert isinstance(got, Refusal), got
    return got


CALL = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "tools/call",
    "params": {"name": "create_issue", "arguments": {"repo": "acme/web", "title": "t"}},
}


def test_tools_call_request() -> None:
    m = parsed(CALL)
    assert (m.kind, m.method, m.id, m.tool) == ("request", "tools/call", 7, "create_issue")
    assert m.arguments == {"repo": "acme/web", "title": "t"}
    assert m.mcp_name == "create_issue"
    assert m.raw == CALL


def test_other_shapes() -> None:
    note = parsed({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert (note.kind, note.id, note.tool, note.arguments) == ("notification", None, None, {})
    listing = parsed({"jsonrpc": "2.0", "id": "a", "method": "tools/list"})
    assert (listing.kind, listing.id, listing.params) == ("request", "a", None)
    read = parsed(
        {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "file:///x"}}
    )
    assert read.mcp_name == "file:///x"
    answer = parsed({"jsonrpc": "2.0", "id": 3, "result": {"action": "accept"}})
    assert (answer.kind, answer.method, answer.id) == ("response", None, 3)
    err = parsed({"jsonrpc": "2.0", "id": 3, "error": {"code": -1, "message": "no"}})
    assert err.kind == "response"
    no_args = parsed({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t"}})
    assert no_args.arguments == {}


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ([CALL], "batch", "batches"),
        (b' \n[{"jsonrpc":"2.0","id":1,"method":"ping"}]', "batch", "batches"),
        ("x", "not_jsonrpc", "object"),
        ({**CALL, "jsonrpc": "1.0"}, "invalid_jsonrpc", '"2.0"'),
        ({"id": 1, "method": "ping"}, "invalid_jsonrpc", '"2.0"'),
        ({**CALL, "id": True}, "invalid_jsonrpc", "id"),
        ({**CALL, "id": 1.5}, "invalid_jsonrpc", "id"),
        ({**CALL, "id": 1.0}, "invalid_jsonrpc", "id"),
        ({**CALL, "id": None}, "invalid_jsonrpc", "id"),
        ({**CALL, "id": [1]}, "invalid_jsonrpc", "id"),
        ({**CALL, "method": 5}, "invalid_jsonrpc", "method"),
        ({**CALL, "method": ""}, "invalid_jsonrpc", "method"),
        ({**CALL, "params": [1]}, "invalid_jsonrpc", "params"),
        ({**CALL, "params": None}, "invalid_jsonrpc", "params"),
        ({**CALL, "extra": 1}, "invalid_jsonrpc", "unknown member"),
        ({**CALL, "result": {}}, "invalid_jsonrpc", "result"),
        ({"jsonrpc": "2.0", "ID": 1, "method": "ping"}, "invalid_jsonrpc", '"id"'),
        ({"jsonrpc": "2.0", "id": 1, "Method": "ping"}, "invalid_jsonrpc", '"method"'),
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, "invalid_jsonrpc", "params"),
        (
            {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "t"}},
            "invalid_jsonrpc",
            "id",
        ),
        ({**CALL, "params": {"arguments": {}}}, "invalid_jsonrpc", "name"),
        ({**CALL, "params": {"name": 3}}, "invalid_jsonrpc", "name"),
        ({**CALL, "params": {"name": "t", "arguments": None}}, "invalid_jsonrpc", "arguments"),
        ({**CALL, "params": {"name": "t", "arguments": [1]}}, "invalid_jsonrpc", "arguments"),
        (
            {**CALL, "params": {"name": "t", "Arguments": {"repo": "evil/x"}}},
            "invalid_jsonrpc",
            "Arguments",
        ),
        ({**CALL, "params": {"NAME": "t"}}, "invalid_jsonrpc", "NAME"),
        ({"jsonrpc": "2.0"}, "invalid_jsonrpc", "method"),
        ({"jsonrpc": "2.0", "id": 1}, "invalid_jsonrpc", "result"),
        ({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {}}, "invalid_jsonrpc", "exactly one"),
        ({"jsonrpc": "2.0", "id": 1, "result": 5}, "invalid_jsonrpc", "result"),
        (
            {"jsonrpc": "2.0", "id": 1, "error": {"code": "x", "message": ""}},
            "invalid_jsonrpc",
            "code",
        ),
        ({"jsonrpc": "2.0", "id": 1, "error": {"code": 1}}, "invalid_jsonrpc", "message"),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}',
            "duplicate_key",
            "twice",
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","Name":"b"}}',
            "duplicate_key",
            "case",
        ),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping"}{}', "trailing_data", "after"),
        (b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}', "not_utf8", "byte-order"),
    ],
)
def test_refused(body: Any, code: str, words: str) -> None:
    got = refusal(body)
    assert got.code == code, got
    assert words in got.message, got


_methods = st.sampled_from(["tools/call", "tools/list", "ping", "initialize", "", "Tools/Call"])
_ids = st.one_of(
    st.integers(-(2**60), 2**60), st.text(max_size=3), st.none(), st.booleans(), st.floats()
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-100, 100) | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=5,
)
_params = st.one_of(
    st.none(),
    _json,
    st.fixed_dictionaries(
        {"name": st.one_of(st.text(max_size=4), st.integers())},
        optional={"arguments": _json, "_meta": _json, "Arguments": _json, "task": _json},
    ),
)
_envelopes = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "2", 2.0]),
        "id": _ids,
        "method": st.one_of(_methods, st.integers()),
        "params": _params,
        "result": _json,
        "error": st.one_of(
            _json, st.fixed_dictionaries({"code": st.integers(), "message": st.text(max_size=3)})
        ),
        "Method": _methods,
    },
)


@settings(max_examples=400, deadline=None)
@given(_envelopes)
def test_accepted_messages_are_what_the_mcp_sdk_reads(envelope: dict[str, Any]) -> None:
    """Whatever the gateway accepts, the official SDK's models accept with the same meaning."""
    body = json.dumps(envelope).encode()
    got = parse_message(body)
    if isinstance(got, Refusal):
        return
    assert got.raw == json.loads(body)
    if got.kind == "request":
        req = JSONRPCRequest.model_validate(got.raw)
        assert (req.method, req.id, req.params) == (got.method, got.id, got.params)
    elif got.kind == "notification":
        note = JSONRPCNotification.model_validate(got.raw)
        assert (note.method, note.params) == (got.method, got.params)
        with pytest.raises(pydantic.ValidationError):
            JSONRPCRequest.model_validate(got.raw)
    elif "result" in got.raw:
        assert JSONRPCResponse.model_validate(got.raw).id == got.id
    if got.method == "tools/call":
        assert got.tool == got.raw["params"]["name"]
        assert got.arguments == got.raw["params"].get("arguments", {})
        try:
            call = CallToolRequestParams.model_validate(got.params)
        except pydantic.ValidationError:
            return  # the server refuses it too (a bad _meta or task): nothing reaches a tool
        assert (call.name, call.arguments or {}) == (got.tool, got.arguments)

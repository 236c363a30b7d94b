"""Answers the way MCP expects them, so a refusal reaches the model instead of a transport error.

A refused `tools/call` can be answered two ways: a JSON-RPC error for the request id (clients
raise it to the agent framework), or a successful call whose result has `isError: true` and
the reason as text (the MCP spec's "tool execution error", which frameworks hand to the model
so it can correct itself). Both carry the same reason. A body that is not valid JSON-RPC gets
the JSON-RPC parse / invalid-request error. A notification has no id to answer: the caller
refuses it at the HTTP level (`None` here).

`filter_tools_list` removes from a `tools/list` answer the tools the agent may not call.
"""

from __future__ import annotations

import json
from typing import Any

from meshgate.mcp.decision import Decision, RequestFacts, ToolPolicy
from meshgate.mcp.jsonrpc import RequestId, parse_message
from meshgate.mcp.strictjson import MAX_BODY_BYTES, Refusal

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
POLICY_REFUSED = -32001  # in -32000..-32019, the implementation-defined server errors
_PARSE_CODES = frozenset({"not_utf8", "not_json", "trailing_data", "too_deep"})


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_response(
    ident: RequestId | None, code: int, message: str, data: dict[str, Any] | None = None
) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return _dump({"jsonrpc": "2.0", "id": ident, "error": error})


def unreadable_response(refusal: Refusal) -> bytes:
    """For a body the parser refused: its id cannot be trusted, so JSON-RPC's `id: null`."""
    code = PARSE_ERROR if refusal.code in _PARSE_CODES else INVALID_REQUEST
    return error_response(
        None, code, f"refused by meshgate: {refusal.message}", {"reason": refusal.code}
    )


def refusal_error(ident: RequestId | None, decision: Decision) -> bytes | None:
    """A JSON-RPC error answering a refused request; None for a notification (no id)."""
    if ident is None:
        return None
    data = {"reason": decision.code, "tool": decision.tool, "rule": decision.rule}
    return error_response(ident, POLICY_REFUSED, f"refused by meshgate: {decision.reason}", data)


def refusal_tool_result(ident: RequestId | None, decision: Decision) -> bytes | None:
    """A `tools/call` result with `isError: true`, the reason as its text; None without an id."""
    if ident is None:
        return None
    text = f"refused by meshgate: {decision.reason}"
    result = {"content": [{"type": "text", "text": text}], "isError": True}
    return _dump({"jsonrpc": "2.0", "id": ident, "result": result})


def filter_tools_list(
    policy: ToolPolicy, request: RequestFacts, body: bytes, max_bytes: int = MAX_BODY_BYTES
) -> bytes | Refusal:
    """A `tools/list` response (one JSON-RPC message, e.g. one SSE event's data) with only the
    tools `policy` may call under the rules that match `request` (the tools/list request). An
    error response passes unchanged; an answer the strict parser refuses, or whose `tools` is
    not a list, is refused (the caller answers with an error rather than show tools it cannot
    vouch for)."""
    message = parse_message(body, max_bytes)
    if isinstance(message, Refusal):
        return message
    if message.kind != "response":
        return Refusal("not_a_response", "expected a JSON-RPC response to tools/list")
    result = message.raw.get("result")
    if result is None:
        return body  # an error response: nothing to filter
    assert isinstance(result, dict)  # parse_message checked it
    tools = result.get("tools")
    if not isinstance(tools, list):
        return Refusal("not_tools_list", 'the result has no "tools" list')
    applicable = policy.applicable(request)
    kept = [
        t
        for t in tools
        if isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and policy.may_call(t["name"], applicable)
    ]
    if len(kept) == len(tools):
        return body
    return _dump({**message.raw, "result": {**result, "tools": kept}})

"""The pacer's MCP part: one streamable-HTTP request body checked against the agent's tool rules,
refusals answered the way MCP clients read them, and `tools/list` answers filtered.

Envoy's routes already chose by tool name (defence in depth); here the same body is read
strictly (`mcp.jsonrpc`), the 2026-07-28 `Mcp-Method`/`Mcp-Name` headers are checked against
it when sent (the 2025-06-18 revision sends none), and the arguments meet the rules
(`ToolPolicy.decide`).

How refusals look (chosen so an agent framework hands them to the model, which can correct
itself, rather than raise a transport error):
- a refused `tools/call` (tool not allowed, arguments refused): HTTP 200, a `tools/call`
  result with `isError: true` whose text names the tool, the rule and what to do (the MCP
  spec's tool execution error, which SDKs return to the caller instead of raising);
- a body that is not one strict JSON-RPC message: HTTP 400, JSON-RPC -32700 / -32600, id null;
- headers that disagree with the body: HTTP 400, JSON-RPC -32020 (the SDK's HEADER_MISMATCH)
  for the request's id.
Each carries `details` (pacing.spec), which the audit record turns into its reason.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2

from meshgate.mcp import decision as mcp_decision
from meshgate.mcp.decision import Decision, RequestFacts, ToolPolicy
from meshgate.mcp.jsonrpc import TOOLS_LIST, Message, RequestId, parse_message
from meshgate.mcp.refusals import (
    error_response,
    filter_tools_list,
    refusal_tool_result,
    unreadable_response,
)
from meshgate.mcp.strictjson import Refusal
from meshgate.pacer.refusals import header
from meshgate.pacing import spec

HEADER_MISMATCH = -32020  # the official SDK's code for routing headers that disagree
MCP_METHOD_HEADER = "mcp-method"
MCP_NAME_HEADER = "mcp-name"
ROUTING_HEADERS = (MCP_METHOD_HEADER, MCP_NAME_HEADER, "mcp-protocol-version")
MODERN = "2026-07-28"  # the first revision with routing headers and `resultType`
NAME_BEARING = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


@dataclass(frozen=True, slots=True)
class Checked:
    """A request's verdict: `refusal` set, or forwarded. `message` is what was read (None if
    unreadable); `lists_tools`: the answer is a tools/list response to filter."""

    refusal: ep.ImmediateResponse | None
    message: Message | None
    decision: Decision | None
    lists_tools: bool = False

    def audit(self) -> dict[str, str]:
        """The record's MCP fields (method, tool, digest of the canonical arguments)."""
        out: dict[str, str] = {}
        if self.decision is not None:
            if self.decision.method:
                out["mcp_method"] = self.decision.method
            if self.decision.tool:
                out["mcp_tool"] = self.decision.tool
            if self.decision.arguments_digest:
                out["mcp_args_digest"] = self.decision.arguments_digest
        elif self.message is not None and self.message.method:
            out["mcp_method"] = self.message.method
        return out


def policy(text: str) -> ToolPolicy:
    """Decoded once per distinct text (`decision.decode` is cached); ValueError if bad."""
    return mcp_decision.decode(text)


def check(
    tools: ToolPolicy,
    refuse_all: bool,
    facts: RequestFacts,
    raw_headers: Sequence[tuple[str, str]],
    body: bytes,
) -> Checked:
    """The verdict on one POST body. `refuse_all`: the agent's refusal route, where nothing is
    forwarded whatever the decision says (the routes found no rule for this call)."""
    message = parse_message(body)
    if isinstance(message, Refusal):
        return Checked(
            _answer(400, unreadable_response(message), spec.MCP_BODY_INVALID), None, None
        )
    if message.kind == "response":  # a client's answer to a server request: nothing to check
        if refuse_all:
            return Checked(_not_forwarded(message, tools), message, None)
        return Checked(None, message, None)
    mismatch = _header_mismatch(message, raw_headers)
    if mismatch is not None:
        body_out = error_response(
            message.id, HEADER_MISMATCH, f"refused by meshgate: {mismatch}", {"reason": "header"}
        )
        return Checked(_answer(400, body_out, spec.MCP_HEADER_MISMATCH), message, None)
    decided = tools.decide(message, facts)
    if refuse_all and decided.allowed:  # never forwarded from here, whatever was decided
        decided = _refused_anyway(message, tools, decided)
    if decided.allowed:
        lists = message.method == TOOLS_LIST and message.kind == "request"
        return Checked(None, message, decided, lists)
    details = (
        spec.MCP_ARGUMENT_REFUSED if decided.code == "argument_refused" else (spec.MCP_TOOL_DENIED)
    )
    answer = _tool_result(message.id, decided, _modern(raw_headers))
    return Checked(_answer(200, answer, details), message, decided)


def shadow_refusal(shadow: ToolPolicy, checked: Checked, facts: RequestFacts) -> str:
    """What shadow mode's tool rules would have refused of a request already read ("" for
    nothing): `<code>: <reason>`, for the audit record only."""
    message = checked.message
    if message is None or message.kind != "request":
        return ""
    decided = shadow.decide(message, facts)
    return "" if decided.allowed else f"{decided.code}: {decided.reason}"[:256]


def _modern(raw_headers: Sequence[tuple[str, str]]) -> bool:
    """A 2026-07-28 (or later) request: its results must say `resultType`."""
    version = next((v for k, v in raw_headers if k.lower() == "mcp-protocol-version"), "")
    return version >= MODERN


def _tool_result(ident: RequestId | None, decided: Decision, modern: bool) -> bytes:
    """A refused tools/call's answer: a tool result with `isError` (what `refusal_tool_result`
    writes), tagged `resultType: complete` for the 2026-07-28 revision, which requires it."""
    if ident is None:  # tools/call always has an id (the parser insists); be safe anyway
        return error_response(None, -32001, f"refused by meshgate: {decided.reason}")
    answer = refusal_tool_result(ident, decided)
    assert answer is not None
    if not modern:
        return answer
    data = json.loads(answer)
    data["result"]["resultType"] = "complete"
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _header_mismatch(message: Message, raw_headers: Sequence[tuple[str, str]]) -> str | None:
    seen: dict[str, str] = {}
    for key, value in raw_headers:
        name = key.lower()
        if name in ROUTING_HEADERS:
            if name in seen:
                return f"the {name} header is sent more than once"
            seen[name] = value
    method_header = seen.get(MCP_METHOD_HEADER)
    if method_header is not None and method_header != message.method:
        return f"the Mcp-Method header ({method_header!r}) is not the body's method"
    name_header = seen.get(MCP_NAME_HEADER)
    body_name = message.mcp_name if message.method in NAME_BEARING else None
    named = name_header is not None or (method_header is not None and body_name is not None)
    if named and _decode_header(name_header) != body_name:
        return "the Mcp-Name header is not the body's tool name or uri"
    return None


def _decode_header(value: str | None) -> str | None:
    """The SDK's `=?base64?...?=` form for values a header cannot carry as they are."""
    if value is None or not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    payload = value[len("=?base64?") : -2]
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _refused_anyway(message: Message, tools: ToolPolicy, decided: Decision) -> Decision:
    allowed = ", ".join(sorted({n for g in tools.grants for n in g.tools})) or "none"
    tool = message.tool or ""
    reason = (
        f'tool "{tool}" is not allowed for agent {tools.agent} on {tools.destination} by this '
        f"method and path (tools its rules name: {allowed}); check the rule's methods, paths "
        "and headers, or ask the policy owners"
    )
    return Decision(
        False, "tool_not_allowed", reason, decided.method, tool, decided.arguments_digest, ""
    )


def _not_forwarded(message: Message, tools: ToolPolicy) -> ep.ImmediateResponse:
    body = error_response(
        message.id,
        -32001,
        f"refused by meshgate: agent {tools.agent} may not send this to {tools.destination}",
    )
    return _answer(400, body, spec.MCP_TOOL_DENIED)


def unlistable(checked: Checked) -> ep.ImmediateResponse:
    """A tools/list whose answer the pacer did not ask to read (Envoy's MCP filter read
    another method): it could not be filtered, so it is not sent."""
    ident = checked.message.id if checked.message is not None else None
    body = error_response(
        ident, -32600, "refused by meshgate: this tools/list cannot be filtered; send it again"
    )
    return _answer(400, body, spec.MCP_BODY_INVALID)


def no_body() -> ep.ImmediateResponse:
    """A call routed as a tools/call that turned out to have no body to answer."""
    message = "refused by meshgate: an MCP request needs one JSON-RPC message as its body"
    return _answer(400, error_response(None, -32600, message), spec.MCP_BODY_INVALID)


def _answer(status: int, body: bytes, details: str) -> ep.ImmediateResponse:
    return ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=ep.HeaderMutation(set_headers=[header("content-type", "application/json")]),
        body=body,
        details=details,
    )


# -- tools/list answers -----------------------------------------------------------------------


def filter_answer(
    tools: ToolPolicy,
    facts: RequestFacts,
    ident: RequestId | None,
    content_type: str,
    body: bytes,
) -> bytes:
    """The answer to a tools/list request with only the tools the agent may call: JSON (one
    message) or SSE (events; the one answering `ident` is filtered, others pass). An answer
    that cannot be read becomes a JSON-RPC error for the request: the gateway shows no tool
    list it cannot vouch for."""
    if content_type.split(";")[0].strip().lower() == "text/event-stream":
        return _filter_sse(tools, facts, ident, body)
    got = filter_tools_list(tools, facts, body)
    if isinstance(got, Refusal):
        return _unlistable(ident, got)
    return got


def _unlistable(ident: RequestId | None, why: Refusal) -> bytes:
    return error_response(
        ident,
        -32603,
        f"refused by meshgate: the server's tools/list answer could not be read ({why.message})",
        {"reason": why.code},
    )


def _filter_sse(
    tools: ToolPolicy, facts: RequestFacts, ident: RequestId | None, body: bytes
) -> bytes:
    text = body.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    events = text.split("\n\n")
    out: list[str] = []
    for event in events:
        if not event.strip():
            out.append(event)
            continue
        lines = event.split("\n")
        data = [ln[5:].removeprefix(" ") for ln in lines if ln.startswith("data:")]
        if not data:
            out.append(event)
            continue
        payload = "\n".join(data).encode("utf-8")
        if not _answers(payload):
            out.append(event)
            continue
        got = filter_tools_list(tools, facts, payload)
        new = _unlistable(ident, got) if isinstance(got, Refusal) else got
        kept = [ln for ln in lines if not ln.startswith("data:")]
        out.append("\n".join([*kept, "data: " + new.decode("utf-8")]))
    return "\n\n".join(out).encode("utf-8")


def _answers(payload: bytes) -> bool:
    """Whether an SSE event's data is a response: on a POST's stream that can only be the
    answer to its request (the rest are the server's requests and notifications), so every
    response is filtered, whatever id it says, and unreadable data counts as one (refused)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return True
    return not (isinstance(data, dict) and "method" in data)

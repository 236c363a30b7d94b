"""One MCP message from a streamable-HTTP POST body (revisions 2025-06-18 and 2026-07-28).

Both revisions send exactly one JSON-RPC message per POST (batches were removed in 2025-06-18),
so an array is refused. The envelope is checked as strictly as the official SDK's models and
the JSON-RPC spec: `jsonrpc` "2.0", only the members JSON-RPC defines, an integer or string id
(the SDK refuses floats and booleans), params an object. A key that differs from a member's
name only in case (`Params`, `Arguments`) is refused too: a case-insensitive server would read
what the gateway ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from meshgate.mcp.strictjson import MAX_BODY_BYTES, MAX_DEPTH, Refusal, fold, read

TOOLS_CALL = "tools/call"
TOOLS_LIST = "tools/list"

Kind = Literal["request", "notification", "response"]
RequestId = int | str

_REQUEST_KEYS = frozenset({"jsonrpc", "id", "method", "params"})
_RESPONSE_KEYS = frozenset({"jsonrpc", "id", "result", "error"})
_ENVELOPE_FOLDS = {fold(k): k for k in _REQUEST_KEYS | _RESPONSE_KEYS}
_CALL_FOLDS = {fold(k): k for k in ("name", "arguments", "_meta")}


@dataclass(frozen=True, slots=True)
class Message:
    """A JSON-RPC message exactly as `json.loads` reads it (`raw`), with its parts at hand."""

    kind: Kind
    raw: dict[str, Any]
    method: str | None = None  # None for a response
    id: RequestId | None = None  # None for a notification
    params: dict[str, Any] | None = None  # None when absent
    simple: bool = False  # canonical.canonical's fast path applies (strictjson.Read.simple)

    @property
    def tool(self) -> str | None:
        """The tool a `tools/call` names."""
        if self.method != TOOLS_CALL or self.params is None:
            return None
        name = self.params.get("name")
        return name if isinstance(name, str) else None

    @property
    def arguments(self) -> dict[str, Any]:
        """A `tools/call`'s arguments; {} when absent (the parser refused every other form)."""
        if self.params is None:
            return {}
        args = self.params.get("arguments")
        return args if isinstance(args, dict) else {}

    @property
    def mcp_name(self) -> str | None:
        """What the 2026-07-28 `Mcp-Name` header must equal: params.name, else params.uri."""
        if self.params is None:
            return None
        for key in ("name", "uri"):
            value = self.params.get(key)
            if isinstance(value, str):
                return value
        return None


def parse_message(
    body: bytes, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_DEPTH
) -> Message | Refusal:
    """The message in a POST body, or why the gateway refuses it (never an exception)."""
    start = body.lstrip(b" \t\r\n")[:1]
    if start == b"[":
        return Refusal("batch", "JSON-RPC batches are not allowed (one message per request)")
    got = read(body, max_bytes, max_depth)
    if isinstance(got, Refusal):
        return got
    if not isinstance(got.value, dict):
        return Refusal("not_jsonrpc", "body is not a JSON object")
    return _envelope(got.value, got.simple)


def _envelope(raw: dict[str, Any], simple: bool) -> Message | Refusal:
    for key in raw:
        known = _ENVELOPE_FOLDS.get(fold(key))
        if known is None:
            return _invalid(f"unknown member {json.dumps(key)}")
        if known != key:
            return _invalid(f"member {json.dumps(key)} must be written {json.dumps(known)}")
    if raw.get("jsonrpc") != "2.0" or not isinstance(raw.get("jsonrpc"), str):
        return _invalid('"jsonrpc" must be "2.0"')
    has_id = "id" in raw
    ident = raw.get("id")
    if has_id and not _valid_id(ident):
        return _invalid('"id" must be a string or an integer')
    if "method" in raw:
        return _request(raw, ident if has_id else None, has_id, simple)
    return _response(raw, ident if has_id else None, simple)


def _valid_id(ident: Any) -> bool:
    return isinstance(ident, str) or (isinstance(ident, int) and not isinstance(ident, bool))


def _request(
    raw: dict[str, Any], ident: RequestId | None, has_id: bool, simple: bool
) -> Message | Refusal:
    if not raw.keys() <= _REQUEST_KEYS:
        return _invalid('a request has no "result" or "error"')
    method = raw["method"]
    if not isinstance(method, str) or not method:
        return _invalid('"method" must be a non-empty string')
    params = raw.get("params")
    if "params" in raw and not isinstance(params, dict):
        return _invalid('"params" must be an object')
    kind: Kind = "request" if has_id else "notification"
    if method == TOOLS_CALL:
        problem = _call_params(params, has_id)
        if problem is not None:
            return problem
    return Message(kind, raw, method, ident, params, simple)


def _call_params(params: dict[str, Any] | None, has_id: bool) -> Refusal | None:
    if not has_id:
        return _invalid("tools/call must be a request (with an id)")
    if params is None:
        return _invalid("tools/call needs params")
    for key in params:
        known = _CALL_FOLDS.get(fold(key))
        if known is not None and known != key:
            return _invalid(f"tools/call param {json.dumps(key)} must be written {known}")
    name = params.get("name")
    if not isinstance(name, str) or not name:
        return _invalid('tools/call needs "name", a non-empty string')
    if "arguments" in params and not isinstance(params["arguments"], dict):
        return _invalid('tools/call "arguments" must be an object')
    return None


def _response(raw: dict[str, Any], ident: RequestId | None, simple: bool) -> Message | Refusal:
    if ident is None:
        return _invalid('a message needs "method" (request, notification) or "id" (response)')
    if "params" in raw:
        return _invalid('a response has no "params"')
    if ("result" in raw) == ("error" in raw):
        return _invalid('a response has exactly one of "result" and "error"')
    if "result" in raw and not isinstance(raw["result"], dict):
        return _invalid('"result" must be an object')
    if "error" in raw:
        error = raw["error"]
        if not isinstance(error, dict):
            return _invalid('"error" must be an object')
        code = error.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            return _invalid('"error.code" must be an integer')
        if not isinstance(error.get("message"), str):
            return _invalid('"error.message" must be a string')
    return Message("response", raw, None, ident, None, simple)


def _invalid(message: str) -> Refusal:
    return Refusal("invalid_jsonrpc", message)

"""Tool and argument decisions, the answers MCP clients get, and tools/list filtering."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp.types import CallToolResult, JSONRPCError, JSONRPCResponse

from meshgate.mcp import decision
from meshgate.mcp.arguments import CompiledTool
from meshgate.mcp.canonical import digest
from meshgate.mcp.decision import Decision, RequestFacts, ToolGrant, ToolPolicy, tool_policy
from meshgate.mcp.jsonrpc import Message, parse_message
from meshgate.mcp.refusals import (
    INVALID_REQUEST,
    PARSE_ERROR,
    POLICY_REFUSED,
    filter_tools_list,
    refusal_error,
    refusal_tool_result,
    unreadable_response,
)
from meshgate.mcp.strictjson import Refusal
from meshgate.policy.loader import load_policy_texts
from meshgate.policy.model import ArgumentRule, HeaderMatch, ToolRule

sys.path.insert(0, str(Path(__file__).parents[1] / "policy"))
from policy_texts import agent, base

POLICY = """\
    - destination: search-api
      methods: [GET]
    - destination: search-api
      tools:
        - list_issues
        - name: create_issue
          arguments:
            repo: {pattern: "^acme/[a-z0-9._-]+$"}
            title: {maxLength: 20}
            labels: {}
            priority: {enum: [low, high]}
            draft: {const: false}
          required: [repo, title]
        - name: comment
          arguments:
            issue: {minimum: 1, maximum: 100000}
            body: {prefix: "bot: ", maxLength: 50}
          additionalArguments: true
    - destination: search-api
      tools:
        - name: create_issue
          arguments:
            repo: {prefix: "sandbox/"}
            title: {}
"""


@pytest.fixture(scope="module")
def policy() -> ToolPolicy:
    model = load_policy_texts(base(agents=agent("coder", POLICY)))
    coder = model.agent("coder")
    assert coder is not None
    return tool_policy(coder, "search-api")


def call(tool: str, arguments: Any = None, ident: int | str = 1) -> Message:
    params: dict[str, Any] = {"name": tool}
    if arguments is not None:
        params["arguments"] = arguments
    body = {"jsonrpc": "2.0", "id": ident, "method": "tools/call", "params": params}
    m = parse_message(json.dumps(body).encode())
    assert isinstance(m, Message), m
    return m


GOOD = {"repo": "acme/web", "title": "Crash on start"}
POST = RequestFacts("POST", "/mcp", {"content-type": "application/json"})


def test_allowed_calls_name_the_rule_that_allowed_them(policy: ToolPolicy) -> None:
    d = policy.decide(
        call("create_issue", {**GOOD, "priority": "high", "labels": [1, {"x": 2}]}), POST
    )
    assert (d.allowed, d.code, d.rule, d.tool) == (
        True,
        "allowed",
        "rule 2 of agent coder",
        "create_issue",
    )
    assert policy.decide(call("list_issues", {"anything": [1, 2]}), POST).allowed
    # the third rule allows what the second refuses: any rule suffices
    d = policy.decide(call("create_issue", {"repo": "sandbox/x", "title": "t"}), POST)
    assert (d.allowed, d.rule) == (True, "rule 3 of agent coder")
    assert policy.decide(call("comment", {"issue": 5, "body": "bot: hi", "extra": 1}), POST).allowed
    assert policy.decide(call("comment", {"issue": 5.5, "body": "bot: x"}), POST).allowed


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (
            {"repo": "evil/web", "title": "t"},
            'tool "create_issue": argument "repo" must match ^acme/[a-z0-9._-]+$ (rule 2 of agent '
            "coder): change it to satisfy the rule; the other rules for this tool refuse it too "
            "(rule 3 of agent coder)",
        ),
        ({"repo": "acme/web\n", "title": "t"}, 'argument "repo" must match'),
        ({"repo": 5, "title": "t"}, 'argument "repo" must be a string matching'),
        ({"repo": "acme/" + "a" * 2000, "title": "t"}, "must be at most 1024 characters"),
        ({**GOOD, "title": "x" * 21}, 'argument "title" must be at most 20 characters long'),
        ({**GOOD, "title": 3}, 'argument "title" must be a string of at most 20'),
        ({"title": "t"}, 'argument "repo" is required (rule 2 of agent coder): send "repo"'),
        ({**GOOD, "assignee": "x"}, 'argument "assignee" is not allowed by this rule'),
        ({"Repo": "evil/x", "title": "t"}, 'argument "Repo" differs from "repo" only in case'),
        ({**GOOD, "priority": "urgent"}, 'argument "priority" must be one of "low", "high"'),
        ({**GOOD, "priority": ["low"]}, 'argument "priority" must be one of'),
        ({**GOOD, "draft": True}, 'argument "draft" must be false'),
        ({**GOOD, "draft": 0}, 'argument "draft" must be false'),
    ],
)
def test_refused_arguments_say_which_rule_and_what_to_do(
    policy: ToolPolicy, arguments: dict[str, Any], reason: str
) -> None:
    d = policy.decide(call("create_issue", arguments), POST)
    assert not d.allowed and d.code == "argument_refused", d
    assert reason in d.reason
    assert d.rule == "rule 2 of agent coder"


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"issue": 0, "body": "bot: "}, "must be at least 1"),
        ({"issue": 100001, "body": "bot: "}, "must be at most 100000"),
        ({"issue": "5", "body": "bot: "}, "must be a number"),
        ({"issue": True, "body": "bot: "}, "must be a number"),
        ({"issue": 1, "body": "hi"}, 'must start with "bot: "'),
        ({"issue": 1, "Body": "hi"}, 'differs from "body" only in case'),
        ({"body": "bot: hi"}, 'argument "issue" is required'),
    ],
)
def test_number_and_prefix_rules(policy: ToolPolicy, arguments: dict[str, Any], words: str) -> None:
    d = policy.decide(call("comment", arguments), POST)
    assert not d.allowed and words in d.reason, d


def test_values_sent_never_appear_in_reasons(policy: ToolPolicy) -> None:
    secret = "sk-live-0123456789abcdef"
    d = policy.decide(call("create_issue", {"repo": secret, "title": secret * 3}), POST)
    assert not d.allowed and secret not in d.reason


def test_only_rules_whose_method_path_and_headers_match_count(policy: ToolPolicy) -> None:
    # rule 1 (GET, no tools) would allow every tool, but a POST is not under it
    d = policy.decide(call("delete_repo", {}), RequestFacts("GET", "/mcp"))
    assert (d.allowed, d.rule) == (True, "rule 1 of agent coder")
    grants = [
        ToolGrant("rule 1", paths=("/admin/*",)),
        ToolGrant("rule 2", ("t",), methods=("POST",), paths=("/mcp",)),
        ToolGrant("rule 3", headers=(HeaderMatch("x-team", "ops"),)),
        ToolGrant("rule 4", headers=(HeaderMatch("x-trace"),)),
    ]
    p = ToolPolicy("a", "d", grants)
    allowed = [
        (RequestFacts("POST", "/admin/x"), "rule 1"),
        (RequestFacts("POST", "/mcp?session=1"), None),
        (RequestFacts("POST", "/mcp", {"x-team": "ops"}), "rule 3"),
        (RequestFacts("POST", "/mcp", {"x-team": "dev"}), None),
        (RequestFacts("POST", "/mcp", {"x-trace": ""}), "rule 4"),
        (RequestFacts("POST", "/admin"), None),
    ]
    for facts, rule in allowed:
        d = p.decide(call("other"), facts)
        assert (d.allowed, d.rule) == (rule is not None, rule or ""), facts
    d = p.decide(call("t"), RequestFacts("POST", "/mcp?session=1"))
    assert (d.allowed, d.rule) == (True, "rule 2")
    d = p.decide(call("t"), RequestFacts("PUT", "/mcp"))
    assert not d.allowed and "allowed tools: none" in d.reason
    tools = _tools_list([{"name": "t"}, {"name": "other"}])
    shown = filter_tools_list(p, RequestFacts("POST", "/mcp"), tools)
    assert isinstance(shown, bytes)
    assert [t["name"] for t in json.loads(shown)["result"]["tools"]] == ["t"]
    assert filter_tools_list(p, RequestFacts("POST", "/admin/"), tools) is tools
    # the pacer's JSON form keeps every condition
    assert decision.decode(decision.encode(p)).grants == p.grants


def test_unknown_tool(policy: ToolPolicy) -> None:
    d = policy.decide(call("delete_repo", {}), POST)
    assert (d.allowed, d.code, d.rule) == (False, "tool_not_allowed", "")
    assert d.reason == (
        'tool "delete_repo" is not allowed for agent coder on search-api: no rule names it '
        "(allowed tools: comment, create_issue, list_issues); use one of those, or ask the "
        "policy owners to add it"
    )


def test_other_methods_pass_and_rules_without_tools_allow_any_tool() -> None:
    policy = ToolPolicy("a", "d", [ToolGrant("rule 1 of agent a", ("x",))])
    for body in (
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 1, "result": {}},
    ):
        m = parse_message(json.dumps(body).encode())
        assert isinstance(m, Message)
        assert policy.decide(m, POST).allowed
    assert not policy.decide(call("y"), POST).allowed
    open_rule = ToolPolicy("a", "d", [ToolGrant("rule 1", ("x",)), ToolGrant("rule 2")])
    d = open_rule.decide(call("y", {"a": 1}), POST)
    assert (d.allowed, d.rule) == (True, "rule 2")
    assert open_rule.may_call("anything", open_rule.applicable(POST))


def test_audit_fields_carry_the_canonical_digest_not_the_arguments(policy: ToolPolicy) -> None:
    d = policy.decide(call("create_issue", {"title": "Crash on start", "repo": "acme/web"}), POST)
    fields = d.audit_fields()
    assert fields == {
        "mcp_method": "tools/call",
        "mcp_tool": "create_issue",
        "mcp_arguments_digest": digest(GOOD),
    }
    body = (
        b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"arguments":'
        b'{"title":"Crash on start","repo":"acme\\/web"},"name":"create_issue"}}'
    )
    m = parse_message(body)
    assert isinstance(m, Message)
    assert policy.decide(m, POST).arguments_digest == fields["mcp_arguments_digest"]
    assert policy.decide(call("list_issues"), POST).arguments_digest == digest({})
    listing = parse_message(b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}')
    assert isinstance(listing, Message)
    assert policy.decide(listing, POST).audit_fields() == {
        "mcp_method": "tools/list",
        "mcp_tool": "",
        "mcp_arguments_digest": "",
    }


def test_refusal_bodies_are_what_the_mcp_sdk_reads(policy: ToolPolicy) -> None:
    m = call("create_issue", {"repo": "evil/x", "title": "t"}, ident="req-7")
    d = policy.decide(m, POST)
    err = refusal_error(m.id, d)
    assert err is not None
    parsed = JSONRPCError.model_validate_json(err)
    assert parsed.id == "req-7"
    assert parsed.error.code == POLICY_REFUSED
    assert parsed.error.message == "refused by meshgate: " + d.reason
    assert parsed.error.data == {
        "reason": "argument_refused",
        "tool": "create_issue",
        "rule": "rule 2 of agent coder",
    }

    result = refusal_tool_result(m.id, d)
    assert result is not None
    response = JSONRPCResponse.model_validate_json(result)
    assert response.id == "req-7"
    tool_result = CallToolResult.model_validate(response.result)
    assert tool_result.is_error is True
    assert tool_result.content[0].text == "refused by meshgate: " + d.reason  # type: ignore[union-attr]
    assert refusal_error(None, d) is None and refusal_tool_result(None, d) is None


@pytest.mark.parametrize(
    ("body", "code"),
    [(b"{", PARSE_ERROR), (b'{"a":1,"a":2}', INVALID_REQUEST), (b"[]", INVALID_REQUEST)],
)
def test_unreadable_bodies_get_json_rpc_errors_with_null_id(body: bytes, code: int) -> None:
    refusal = parse_message(body)
    assert isinstance(refusal, Refusal)
    answer = JSONRPCError.model_validate_json(unreadable_response(refusal))
    assert answer.id is None and answer.error.code == code
    assert answer.error.data == {"reason": refusal.code}


def _tools_list(tools: list[Any], **extra: Any) -> bytes:
    result = {"tools": tools, **extra}
    return json.dumps({"jsonrpc": "2.0", "id": 4, "result": result}).encode()


def test_tools_list_shows_only_callable_tools(policy: ToolPolicy) -> None:
    tools = [
        {"name": n, "inputSchema": {"type": "object"}}
        for n in ("create_issue", "delete_repo", "list_issues", "comment")
    ]
    out = filter_tools_list(
        policy, POST, _tools_list([*tools, "junk", {"nameless": 1}], nextCursor="c2")
    )
    assert isinstance(out, bytes)
    data = json.loads(out)
    assert [t["name"] for t in data["result"]["tools"]] == [
        "create_issue",
        "list_issues",
        "comment",
    ]
    assert (data["id"], data["result"]["nextCursor"]) == (4, "c2")
    unchanged = _tools_list([tools[0]])
    assert filter_tools_list(policy, POST, unchanged) is unchanged
    error = b'{"jsonrpc":"2.0","id":4,"error":{"code":-1,"message":"x"}}'
    assert filter_tools_list(policy, POST, error) is error


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"jsonrpc":"2.0","id":4,"result":{"tools":{}}}', "not_tools_list"),
        (b'{"jsonrpc":"2.0","id":4,"result":{"tools":[],"tools":[]}}', "duplicate_key"),
        (b'{"jsonrpc":"2.0","id":4,"method":"tools/list"}', "not_a_response"),
        (b"[]", "batch"),
    ],
)
def test_tools_list_answers_that_cannot_be_vouched_for_are_refused(
    policy: ToolPolicy, body: bytes, code: str
) -> None:
    out = filter_tools_list(policy, POST, body)
    assert isinstance(out, Refusal) and out.code == code


def test_policy_travels_as_json_and_is_compiled_once(policy: ToolPolicy) -> None:
    text = decision.encode(policy)
    assert text.isascii()
    again = decision.decode(text)
    assert decision.decode(text) is again  # cached on the text
    assert again.grants == policy.grants
    for arguments in (GOOD, {"repo": "evil/x", "title": "t"}, {"repo": "sandbox/a", "title": "t"}):
        a, b = (
            policy.decide(call("create_issue", arguments), POST),
            again.decide(call("create_issue", arguments), POST),
        )
        assert a == b
    with pytest.raises(ValueError, match="bad tool policy"):
        decision.decode(
            '["a","d",[{"label":"x","tools":["t"],"tool_rules":[{"name":"t","arguments":[{"name":"a","pattern":"(a+)+"}]}]}]]'
        )
    with pytest.raises(ValueError, match="bad tool policy"):
        decision.decode("{")


def test_non_ascii_rules_travel_as_ascii() -> None:
    rule = ToolRule("t", (ArgumentRule("städte", enum=('"Zürich"',)),))
    policy = ToolPolicy("a", "d", [ToolGrant("rule 1 of agent a", ("t",), (rule,))])
    text = decision.encode(policy)
    assert text.isascii()
    back = decision.decode(text)
    assert back.decide(call("t", {"städte": "Zürich"}), POST).allowed
    assert not back.decide(call("t", {"städte": "Bern"}), POST).allowed


def test_decisions_are_cheap(policy: ToolPolicy) -> None:
    """Per request: parse, decide, digest. CPU time on a shared machine: a loose bound."""
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "create_issue", "arguments": GOOD},
        }
    ).encode()
    n = 2000
    start = time.process_time()
    for _ in range(n):
        m = parse_message(body)
        assert isinstance(m, Message)
        d = policy.decide(m, POST)
    per_call = (time.process_time() - start) / n
    assert isinstance(d, Decision) and d.allowed
    assert per_call < 500e-6, f"{per_call * 1e6:.0f} µs per request"


def test_compiled_tool_checks_only_what_the_rule_says() -> None:
    free = CompiledTool(ToolRule("t", additional_arguments=True))
    assert free.check({"anything": 1}) is None
    closed = CompiledTool(ToolRule("t"))
    v = closed.check({"a": 1})
    assert v is not None and v.must == "is not allowed by this rule" and "none" in v.hint
    assert closed.check({}) is None


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["acme/web", "sandbox/x", "bot: hi", "low", "high", "acme/§secret"]),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=6,
)
_arg_names = st.sampled_from(
    ["repo", "title", "labels", "priority", "draft", "issue", "body", "Repo", "x"]
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["create_issue", "comment", "list_issues", "other"]),
    st.dictionaries(_arg_names, _values, max_size=5),
)
def test_any_arguments_get_a_decision_that_echoes_no_value(
    policy: ToolPolicy, tool: str, arguments: dict[str, Any]
) -> None:
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": tool, "arguments": arguments},
        }
    ).encode()
    m = parse_message(body)
    if isinstance(m, Refusal):
        return
    d = policy.decide(m, POST)
    assert d.tool == tool and d.arguments_digest == digest(m.arguments)
    assert d.allowed == (d.code == "allowed") and d.allowed == (d.reason == "")
    assert "§" not in d.reason  # values sent never appear (rules and names hold no §)
    if not d.allowed:
        assert refusal_error(m.id, d) is not None

"""The subset check: a sub-agent's rule never allows a request its parent's rule does not."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.delegation.rights import (
    DelegationError,
    RuleGrant,
    narrow,
    narrows,
    path_within,
    sub_delegation,
    sub_rules,
)
from meshgate.policy.model import AgentPolicy, Delegation, EgressRule, RateLimit, ToolRule

METHODS = ("GET", "POST", "PUT", "DELETE")
PATHS = ("/", "/*", "/a", "/a*", "/a/*", "/a/b", "/a/b/*", "/ab", "/ab/*", "/b", "/b/*", "/a/bc")
REQUEST_PATHS = ("/", "/a", "/a/", "/a/b", "/a/b/c", "/ab", "/ab/x", "/b", "/b/c", "/a/bc", "/c")


def route_allows(rule: EgressRule, method: str, path: str) -> bool:
    """How the gateway's routes match a rule (allowlist._path_match and the method regex)."""
    if rule.methods and method not in rule.methods:
        return False
    if not rule.paths:
        return True
    return any(path.startswith(p[:-1]) if p.endswith("*") else path == p for p in rule.paths)


subsets = lambda items: st.lists(st.sampled_from(items), unique=True, max_size=len(items))  # noqa: E731


@settings(max_examples=500, deadline=None)
@given(
    parent_methods=subsets(METHODS),
    parent_paths=subsets(PATHS),
    asked_methods=subsets(METHODS),
    asked_paths=subsets(PATHS),
)
def test_whatever_a_sub_agent_may_do_its_parent_may(
    parent_methods: list[str],
    parent_paths: list[str],
    asked_methods: list[str],
    asked_paths: list[str],
) -> None:
    parent = EgressRule("d", methods=tuple(parent_methods), paths=tuple(parent_paths))
    grant = RuleGrant(0, tuple(asked_methods), tuple(asked_paths))
    try:
        sub = narrow(parent, grant, "rules[0]")
    except DelegationError:
        # refused only when something asked is outside the parent's rule
        outside_method = parent_methods and not set(asked_methods) <= set(parent_methods)
        outside_path = parent_paths and not all(
            any(path_within(p, q) for q in parent_paths) for p in asked_paths
        )
        assert outside_method or outside_path
        return
    assert narrows(sub, parent)
    for method in METHODS:
        for path in REQUEST_PATHS:
            if route_allows(sub, method, path):
                assert route_allows(parent, method, path), (sub, method, path)


@pytest.mark.parametrize(
    ("inner", "outer", "within"),
    [
        ("/a", "/a", True),
        ("/a", "/a/*", False),  # "/a/*" is the prefix "/a/": "/a" itself is outside
        ("/a/b", "/a/*", True),
        ("/a/*", "/a/*", True),
        ("/a/b/*", "/a/*", True),
        ("/a*", "/a/*", False),  # "/ab" would be allowed
        ("/a/*", "/a", False),
        ("/ab", "/a*", True),
    ],
)
def test_path_within(inner: str, outer: str, within: bool) -> None:
    assert path_within(inner, outer) is within


def test_refusals_say_what_exceeds_the_parent() -> None:
    parent = EgressRule("d", methods=("GET",), paths=("/v1/*",), tools=("search",))
    with pytest.raises(DelegationError, match="method 'POST' is not allowed by the parent's rule"):
        narrow(parent, RuleGrant(0, methods=("POST",)), "rules[0]")
    with pytest.raises(DelegationError, match=r"path '/v2/x' is not inside the parent's paths"):
        narrow(parent, RuleGrant(0, paths=("/v2/x",)), "rules[0]")
    with pytest.raises(DelegationError, match="tool 'delete' is not allowed"):
        narrow(parent, RuleGrant(0, tools=("delete",)), "rules[0]")
    with pytest.raises(DelegationError, match="an absolute path"):
        narrow(parent, RuleGrant(0, paths=("v1/x",)), "rules[0]")
    plain = EgressRule("d")
    with pytest.raises(DelegationError, match="names no MCP tools"):
        narrow(plain, RuleGrant(0, tools=("search",)), "rules[0]")


def test_limits_and_tool_arguments_are_the_parents() -> None:
    rules = (ToolRule("search"), ToolRule("fetch"))
    parent = EgressRule(
        "d",
        tools=("search", "fetch"),
        rate_limit=RateLimit(10, 60),
        tool_rules=rules,
    )
    sub = narrow(parent, RuleGrant(0, tools=("fetch",)), "rules[0]")
    assert sub.tools == ("fetch",) and sub.tool_rules == (ToolRule("fetch"),)
    assert sub.rate_limit == parent.rate_limit
    assert narrows(sub, parent)
    # a rule with a limit lifted is not narrower, whatever else it keeps
    assert not narrows(dataclasses.replace(sub, rate_limit=None), parent)


def test_sub_rules_name_parent_rules_by_index() -> None:
    parent = AgentPolicy("p", "p", (EgressRule("a"), EgressRule("b", methods=("GET",))))
    rules, prints = sub_rules(parent, (RuleGrant(1),))
    # the parent's rule, drawing from the parent's counters for it (never more than it)
    assert rules == (EgressRule("b", methods=("GET",), counters=("p", 1)),) and len(prints) == 1
    grandchild = AgentPolicy("p.c", "p.c", rules)
    assert sub_rules(grandchild, (RuleGrant(0),))[0][0].counters == ("p", 1)
    with pytest.raises(DelegationError, match="'p' has no rule 2"):
        sub_rules(parent, (RuleGrant(2),))
    with pytest.raises(DelegationError, match="at least one"):
        sub_rules(parent, ())
    with pytest.raises(DelegationError, match="the same rule as an earlier one"):
        sub_rules(parent, (RuleGrant(0), RuleGrant(0)))


def test_a_sub_agent_delegates_no_more_than_its_parent() -> None:
    assert sub_delegation(Delegation(3, 600), None) is None
    assert sub_delegation(Delegation(3, 600), Delegation(1, 60)) == Delegation(1, 60)
    with pytest.raises(DelegationError, match="the parent's own limits"):
        sub_delegation(Delegation(3, 600), Delegation(4, 60))
    with pytest.raises(DelegationError, match="may not delegate"):
        sub_delegation(None, Delegation(1, 60))

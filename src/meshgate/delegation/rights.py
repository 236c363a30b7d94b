"""A sub-agent's rights: the parent's rules it keeps, each only narrowed. Pure.

A sub-agent never gets a rule of its own: it names rules of its parent (by index) and may only
narrow each one, by fields whose containment is plain set or string-prefix inclusion:

- methods: a subset of the parent rule's methods (any methods, if the parent's allows any);
- paths: each one an exact path or `prefix*` inside one of the parent rule's paths;
- tools: a subset of the parent rule's MCP tools (the parent's argument rules kept).

Everything else (destination, required headers, rate limit, concurrency, models, maxTokens,
budgets) is the parent's, unchanged. So whatever a sub-agent's routes allow, the parent's
allow: `narrows` states it and the tests check it against random requests.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from meshgate.errors import MeshgateError
from meshgate.policy.model import AgentPolicy, Delegation, EgressRule
from meshgate.policy.syntax import HTTP_METHODS

MAX_RULES = 256  # a sub-agent's rules: more than any real one needs, bounded for the CP
MAX_ITEMS = 64  # methods, paths or tools per narrowed rule


class DelegationError(MeshgateError):
    """A sub-agent request that must be refused; the message says why."""


@dataclass(frozen=True)
class RuleGrant:
    """One parent rule the sub-agent keeps; an empty field keeps the parent's."""

    rule: int  # index into the parent's rules (as `meshgate plan` numbers them)
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()


def fingerprint(rule: EgressRule) -> str:
    """Identifies a parent rule exactly: a sub-agent keeps a rule only while the parent still
    has it, unchanged (frozen dataclasses of str/int/tuples: a stable repr)."""
    return hashlib.sha256(repr(rule).encode()).hexdigest()[:32]


def path_within(inner: str, outer: str) -> bool:
    """Every request path `inner` matches is matched by `outer` (`x*`: prefix x; else exact)."""
    if not outer.endswith("*"):
        return inner == outer
    prefix = outer[:-1]
    return inner[:-1].startswith(prefix) if inner.endswith("*") else inner.startswith(prefix)


def _check_path(p: str) -> None:
    if (
        not p.startswith("/")
        or "*" in p[:-1]
        or any(c.isspace() for c in p)
        or "?" in p
        or "#" in p
        or len(p) > 1024
    ):
        raise DelegationError(f"path {p!r}: an absolute path, '*' only at the end as a prefix")


def narrow(parent_rule: EgressRule, grant: RuleGrant, where: str) -> EgressRule:
    """The parent's rule narrowed as `grant` asks, or DelegationError saying what exceeds it."""
    for what, items in (("methods", grant.methods), ("paths", grant.paths), ("tools", grant.tools)):
        if len(items) > MAX_ITEMS:
            raise DelegationError(f"{where}: at most {MAX_ITEMS} {what}")
        if len(set(items)) != len(items):
            raise DelegationError(f"{where}: {what} listed twice")
    rule = parent_rule
    if grant.methods:
        allowed = parent_rule.methods or HTTP_METHODS
        extra = [m for m in grant.methods if m not in allowed]
        if extra:
            raise DelegationError(
                f"{where}: method {extra[0]!r} is not allowed by the parent's rule "
                f"(it allows {', '.join(allowed)})"
            )
        rule = dataclasses.replace(rule, methods=tuple(grant.methods))
    if grant.paths:
        for p in grant.paths:
            _check_path(p)
            if parent_rule.paths and not any(path_within(p, q) for q in parent_rule.paths):
                raise DelegationError(
                    f"{where}: path {p!r} is not inside the parent's paths "
                    f"({', '.join(parent_rule.paths)})"
                )
        rule = dataclasses.replace(rule, paths=tuple(grant.paths))
    if grant.tools:
        if not parent_rule.tools:
            raise DelegationError(
                f"{where}: the parent's rule names no MCP tools, so there are none to narrow"
            )
        extra = [t for t in grant.tools if t not in parent_rule.tools]
        if extra:
            raise DelegationError(
                f"{where}: tool {extra[0]!r} is not allowed by the parent's rule "
                f"(it allows {', '.join(parent_rule.tools)})"
            )
        kept = set(grant.tools)
        rule = dataclasses.replace(
            rule,
            tools=tuple(t for t in parent_rule.tools if t in kept),
            tool_rules=tuple(t for t in parent_rule.tool_rules if t.name in kept),
        )
    return rule


def narrows(inner: EgressRule, outer: EgressRule) -> bool:
    """`inner` allows no request `outer` does not: what `narrow` guarantees, checkable alone."""

    def rest(r: EgressRule) -> EgressRule:  # what narrowing keeps as it is
        return dataclasses.replace(r, methods=(), paths=(), tools=(), tool_rules=(), counters=None)

    if rest(inner) != rest(outer):
        return False
    if outer.methods and (not inner.methods or not set(inner.methods) <= set(outer.methods)):
        return False
    if outer.paths and (
        not inner.paths or not all(any(path_within(p, q) for q in outer.paths) for p in inner.paths)
    ):
        return False
    if outer.tools and (not inner.tools or not set(inner.tools) <= set(outer.tools)):
        return False
    return set(inner.tool_rules) <= set(outer.tool_rules)


def sub_rules(
    parent: AgentPolicy, grants: Sequence[RuleGrant]
) -> tuple[tuple[EgressRule, ...], tuple[str, ...]]:
    """The sub-agent's rules and the fingerprints of the parent rules they narrow."""
    if not grants:
        raise DelegationError("a sub-agent needs at least one of its parent's rules")
    if len(grants) > MAX_RULES:
        raise DelegationError(f"a sub-agent keeps at most {MAX_RULES} rules")
    rules: list[EgressRule] = []
    prints: list[str] = []
    for n, grant in enumerate(grants):
        where = f"rules[{n}] (parent rule {grant.rule})"
        if not 0 <= grant.rule < len(parent.rules):
            raise DelegationError(
                f"rules[{n}]: {parent.agent!r} has no rule {grant.rule} "
                f"(it has {len(parent.rules)}, numbered from 0)"
            )
        parent_rule = parent.rules[grant.rule]
        # its rate limit, budgets and caps are the parent rule's counters, not copies of them
        owner = parent_rule.owner(parent.agent, grant.rule)
        rule = dataclasses.replace(narrow(parent_rule, grant, where), counters=owner)
        if rule in rules:
            raise DelegationError(f"{where}: the same rule as an earlier one")
        rules.append(rule)
        prints.append(fingerprint(parent_rule))
    return tuple(rules), tuple(prints)


def sub_delegation(parent: Delegation | None, asked: Delegation | None) -> Delegation | None:
    """What a sub-agent may delegate in turn: never more than its parent may."""
    if asked is None:
        return None
    if parent is None:
        raise DelegationError("the parent may not delegate, so neither may its sub-agent")
    if asked.max_sub_agents > parent.max_sub_agents or asked.max_ttl_seconds > (
        parent.max_ttl_seconds
    ):
        raise DelegationError(
            f"delegation: at most {parent.max_sub_agents} sub-agents for "
            f"{parent.max_ttl_seconds}s each (the parent's own limits)"
        )
    return asked

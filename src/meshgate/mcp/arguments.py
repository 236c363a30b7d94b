"""Checks of one tool entry's argument rules against a call's arguments, compiled once.

A `CompiledTool` turns a policy `ToolRule` into a list of small closures over precompiled
regexes and canonical values, so a call costs a dict walk and a few comparisons. Messages name
the argument and the rule, never the value sent (arguments can hold secrets).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshgate.mcp.canonical import NotCanonical, canonical_text
from meshgate.mcp.strictjson import fold
from meshgate.policy.model import ArgumentRule, ToolRule
from meshgate.policy.syntax import PATTERN_INPUT_LIMIT, compile_argument_pattern


@dataclass(frozen=True, slots=True)
class Violation:
    """Why arguments fail a tool entry: `argument` (None: the call as a whole), what it `must`
    be, and a hint of what the caller can do."""

    argument: str | None
    must: str
    hint: str

    def describe(self) -> str:
        where = f'argument "{self.argument}"' if self.argument is not None else "arguments"
        return f"{where} {self.must}"


Check = Callable[[Any], str | None]  # a value -> None, or what it must be


class CompiledTool:
    """One tool entry's rules, ready to run."""

    __slots__ = ("_additional", "_checks", "_folded", "_required", "rule")

    def __init__(self, rule: ToolRule) -> None:
        self.rule = rule
        self._checks: tuple[tuple[str, tuple[Check, ...]], ...] = tuple(
            (a.name, _checks(a)) for a in rule.arguments
        )
        self._required = rule.required
        self._folded = {fold(a.name): a.name for a in rule.arguments}
        self._additional = rule.additional_arguments

    def check(self, arguments: dict[str, Any]) -> Violation | None:
        for key in arguments:
            known = self._folded.get(fold(key))
            if known is not None and known != key:
                return Violation(
                    key,
                    f'differs from "{known}" only in case',
                    f'send it as "{known}" (some servers read both as one argument)',
                )
            if known is None and not self._additional:
                allowed = ", ".join(f'"{n}"' for n, _ in self._checks) or "none"
                return Violation(
                    key, "is not allowed by this rule", f"allowed arguments: {allowed}"
                )
        for name in self._required:
            if name not in arguments:
                return Violation(name, "is required", f'send "{name}"')
        for name, checks in self._checks:
            if name not in arguments:
                continue
            value = arguments[name]
            for check in checks:
                problem = check(value)
                if problem is not None:
                    return Violation(name, problem, "change it to satisfy the rule")
        return None


def _checks(a: ArgumentRule) -> tuple[Check, ...]:
    out: list[Check] = []
    if a.const is not None:
        out.append(_in({a.const}, f"must be {a.const}"))
    if a.enum:
        out.append(_in(set(a.enum), "must be one of " + ", ".join(a.enum)))
    if a.pattern is not None:
        out.append(_pattern(a.pattern))
    if a.prefix is not None:
        prefix = a.prefix
        message = f"must start with {json.dumps(prefix, ensure_ascii=False)}"
        out.append(lambda v: None if isinstance(v, str) and v.startswith(prefix) else message)
    if a.max_length is not None:
        out.append(_max_length(a.max_length))
    if a.minimum is not None or a.maximum is not None:
        out.append(_range(a.minimum, a.maximum))
    return tuple(out)


def _in(allowed: set[str], message: str) -> Check:
    def check(v: Any) -> str | None:
        try:
            return None if canonical_text(v) in allowed else message
        except NotCanonical:
            return message

    return check


def _pattern(pattern: str) -> Check:
    regex = compile_argument_pattern(pattern)
    message = f"must match {pattern}"

    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be a string matching {pattern}"
        if len(v) > PATTERN_INPUT_LIMIT:
            return f"must be at most {PATTERN_INPUT_LIMIT} characters to be matched with {pattern}"
        return None if regex.fullmatch(v) else message

    return check


def _max_length(limit: int) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be a string of at most {limit} characters"
        return None if len(v) <= limit else f"must be at most {limit} characters long"

    return check


def _range(low: float | None, high: float | None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return "must be a number"
        if low is not None and v < low:
            return f"must be at least {low}"
        if high is not None and v > high:
            return f"must be at most {high}"
        return None

    return check

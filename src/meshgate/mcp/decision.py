"""May this agent send this MCP message to this destination? And which tools may it see?

The pacer builds one `ToolPolicy` per (agent, destination) rule set, once (it is cached on the
rule set's JSON), and asks it per request. A request is allowed when any of the agent's rules
for the destination allows it, as everywhere in meshgate, counting only rules whose methods,
paths and headers match the request (`RequestFacts`): a rule without tools allows every tool,
a plain tool name allows any arguments, a tool entry with argument rules allows the calls whose
arguments pass them. Only `tools/call` is checked; every other method passes here (Envoy's
routes already decided the rest of the request).

Refusals name the tool, the rule and what to do, so an agent framework can show them to the
model (see `refusals.py` for the MCP-shaped bodies).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import TypeAdapter

from meshgate.mcp.arguments import CompiledTool, Violation
from meshgate.mcp.canonical import NotCanonical, digest
from meshgate.mcp.jsonrpc import TOOLS_CALL, Message
from meshgate.policy.model import AgentPolicy, HeaderMatch, ToolRule

Code = Literal["allowed", "tool_not_allowed", "argument_refused"]
TOOL_NOT_ALLOWED: Code = "tool_not_allowed"
ARGUMENT_REFUSED: Code = "argument_refused"


@dataclass(frozen=True)
class RequestFacts:
    """What the gateway routed on besides the body: a rule counts only when these match it.

    `path` as Envoy matched it (after the gateway's path canonicalisation; a query is ignored),
    `headers` with lower-case names."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolGrant:
    """What one rule of an agent says about tools, with the conditions under which it applies
    (the same as its Envoy routes: methods, paths, headers) and the label refusals cite."""

    label: str  # "rule 2 of agent coder"
    tools: tuple[str, ...] = ()  # empty: any tool
    tool_rules: tuple[ToolRule, ...] = ()
    methods: tuple[str, ...] = ()  # empty: any method
    paths: tuple[str, ...] = ()  # exact "/a" or prefix "/a/*"; empty: any path
    headers: tuple[HeaderMatch, ...] = ()

    def applies(self, request: RequestFacts) -> bool:
        if self.methods and request.method not in self.methods:
            return False
        if self.paths:
            path = request.path.partition("?")[0]
            if not any(
                path.startswith(p[:-1]) if p.endswith("*") else path == p for p in self.paths
            ):
                return False
        for h in self.headers:
            value = request.headers.get(h.name)
            if value is None or (h.value is not None and value != h.value):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one message, with what the audit record keeps of it."""

    allowed: bool
    code: Code
    reason: str  # "" when allowed
    method: str  # JSON-RPC method ("" for a response)
    tool: str  # params.name of a tools/call, else ""
    arguments_digest: str  # sha256:<hex> of the canonical arguments of a tools/call, else ""
    rule: str  # label of the rule that allowed or refused it ("" when no rule is involved)

    def audit_fields(self) -> dict[str, str]:
        """The audit record's MCP fields (the arguments themselves are never kept here)."""
        return {
            "mcp_method": self.method,
            "mcp_tool": self.tool,
            "mcp_arguments_digest": self.arguments_digest,
        }


@dataclass(frozen=True, slots=True)
class _Entry:
    grant: int  # index into the policy's grants
    compiled: CompiledTool | None  # None: a plain name, any arguments


class ToolPolicy:
    """The tool rules of one agent for one destination, compiled."""

    __slots__ = ("_any", "_entries", "agent", "destination", "grants")

    def __init__(self, agent: str, destination: str, grants: Sequence[ToolGrant]) -> None:
        self.agent = agent
        self.destination = destination
        self.grants = tuple(grants)
        self._any = tuple(i for i, g in enumerate(self.grants) if not g.tools)
        entries: dict[str, list[_Entry]] = {}
        for i, g in enumerate(self.grants):
            with_rules = {t.name: t for t in g.tool_rules}
            for name in g.tools:
                rule = with_rules.get(name)
                compiled = CompiledTool(rule) if rule is not None else None
                entries.setdefault(name, []).append(_Entry(i, compiled))
        self._entries = entries

    def applicable(self, request: RequestFacts) -> tuple[bool, ...]:
        return tuple(g.applies(request) for g in self.grants)

    def may_call(self, tool: str, applicable: Sequence[bool]) -> bool:
        """Whether some call of `tool` can be allowed (what `tools/list` shows)."""
        if any(applicable[i] for i in self._any):
            return True
        return any(applicable[e.grant] for e in self._entries.get(tool, ()))

    def decide(self, message: Message, request: RequestFacts) -> Decision:
        method = message.method or ""
        tool = message.tool
        if method != TOOLS_CALL or tool is None:
            return Decision(True, "allowed", "", method, "", "", "")
        try:
            arguments_digest = digest(message.arguments, message.simple)
        except NotCanonical:  # the strict parser refuses such bodies; never trust a bypass
            arguments_digest = ""
        applicable = self.applicable(request)
        for i in self._any:
            if applicable[i]:
                label = self.grants[i].label
                return Decision(True, "allowed", "", method, tool, arguments_digest, label)
        entries = [e for e in self._entries.get(tool, ()) if applicable[e.grant]]
        if not entries:
            reason = self._not_allowed(tool, applicable)
            return Decision(False, TOOL_NOT_ALLOWED, reason, method, tool, arguments_digest, "")
        refused: list[tuple[str, Violation]] = []
        for entry in entries:
            violation = None if entry.compiled is None else entry.compiled.check(message.arguments)
            label = self.grants[entry.grant].label
            if violation is None:
                return Decision(True, "allowed", "", method, tool, arguments_digest, label)
            refused.append((label, violation))
        label, violation = refused[0]
        reason = f'tool "{tool}": {violation.describe()} ({label}): {violation.hint}'
        if len(refused) > 1:
            others = ", ".join(lbl for lbl, _ in refused[1:])
            reason += f"; the other rules for this tool refuse it too ({others})"
        return Decision(False, ARGUMENT_REFUSED, reason, method, tool, arguments_digest, label)

    def _not_allowed(self, tool: str, applicable: Sequence[bool]) -> str:
        allowed = sorted(
            name for name, es in self._entries.items() if any(applicable[e.grant] for e in es)
        )
        listed = ", ".join(allowed[:20]) + (", ..." if len(allowed) > 20 else "")
        return (
            f'tool "{tool}" is not allowed for agent {self.agent} on {self.destination}: '
            f"no rule names it (allowed tools: {listed or 'none'}); use one of those, or ask "
            f"the policy owners to add it"
        )


def grants_for(agent: AgentPolicy, destination: str) -> tuple[ToolGrant, ...]:
    """The agent's rules for `destination`, numbered as in the compiled policy (from 1)."""
    return tuple(
        ToolGrant(
            f"rule {i} of agent {agent.agent}",
            r.tools,
            r.tool_rules,
            r.methods,
            r.paths,
            r.headers,
        )
        for i, r in enumerate(agent.rules, start=1)
        if r.destination == destination and r.enforced
    )


def tool_policy(agent: AgentPolicy, destination: str) -> ToolPolicy:
    return ToolPolicy(agent.agent, destination, grants_for(agent, destination))


# -- carried to the pacer ---------------------------------------------------------------------
# The pacer holds no policy (pacing/spec.py): a route hands it what applies, as JSON. The
# compiled policy is cached on that text, so a request pays one dict lookup to find it.

_GRANTS: TypeAdapter[tuple[str, str, tuple[ToolGrant, ...]]] = TypeAdapter(
    tuple[str, str, tuple[ToolGrant, ...]]
)


def encode(policy: ToolPolicy) -> str:
    """Compact, stable JSON (ASCII: it can travel as gRPC metadata)."""
    data = _GRANTS.dump_python((policy.agent, policy.destination, policy.grants), mode="json")
    return json.dumps(data, ensure_ascii=True, separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def decode(text: str) -> ToolPolicy:
    """The policy `encode` wrote; ValueError for anything else (the pacer then refuses)."""
    try:
        agent, destination, grants = _GRANTS.validate_json(text)
        return ToolPolicy(agent, destination, grants)
    except ValueError as e:  # pydantic's errors, a pattern outside the dialect
        raise ValueError(f"bad tool policy: {e}") from None

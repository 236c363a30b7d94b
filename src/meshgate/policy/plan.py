"""What applying a new policy would change, like `terraform plan`: pure diff plus renderers.

The diff is over compiled models, so formatting-only edits to YAML are "No changes". Secret
values never appear (the model only has secret names); credential formats are reported as
changed without showing either side, since a careless format could embed a literal key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from meshgate.policy.model import (
    AgentPolicy,
    ArgumentRule,
    Budget,
    Concurrency,
    Destination,
    EgressRule,
    Mesh,
    PolicyModel,
)

Action = Literal["add", "change", "remove"]
_SIGN = {"add": "+", "change": "~", "remove": "-"}


@dataclass(frozen=True)
class Detail:
    """A line under a change: a field ("port", "443" -> "8443") or a rule added/removed/changed."""

    action: Action
    subject: str
    before: str | None = None
    after: str | None = None

    def text(self) -> str:
        if self.action == "change" and (self.before is not None or self.after is not None):
            return f"{self.subject}: {self.before} -> {self.after}"
        value = self.after if self.action == "add" else self.before
        return f"{self.subject}: {value}" if value is not None else self.subject


@dataclass(frozen=True)
class Change:
    action: Action
    kind: Literal["mesh", "destination", "agent"]
    name: str
    details: tuple[Detail, ...] = ()


@dataclass(frozen=True)
class Plan:
    old_version: str | None
    new_version: str
    changes: tuple[Change, ...]

    def count(self, action: Action) -> int:
        return sum(1 for c in self.changes if c.action == action)

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)


def format_period(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def describe_rule(r: EgressRule) -> str:
    parts = [r.destination, ",".join(r.methods) or "any method", ",".join(r.paths) or "any path"]
    if not r.enforced:
        parts.insert(0, "[shadow]")
    if r.headers:
        parts.append("headers " + ",".join(_header(h.name, h.value) for h in r.headers))
    if r.tools:
        parts.append("tools " + ",".join(r.tools))
    parts.append(_rate(r))
    return " ".join(parts)


def _header(name: str, value: str | None) -> str:
    return name if value is None else f"{name}={value}"


def _rate(r: EgressRule) -> str:
    if r.rate_limit is None:
        return "unlimited"
    limit = r.rate_limit
    text = f"{limit.requests}/{format_period(limit.per_seconds)}"
    if limit.scope == "global":
        text += f" global (store down: {limit.on_store_failure})"
    return text


def _concurrency(c: Concurrency | None) -> str:
    return "none" if c is None else f"{c.max} in flight, wait {c.max_wait_ms / 1000:g}s"


def _budgets(budgets: tuple[Budget, ...]) -> str:
    return ", ".join(
        f"{b.name} {b.limit} {b.unit}/{b.window} (store down: {b.on_store_failure})"
        for b in budgets
    )


def _tool_rules(r: EgressRule) -> str:
    """Argument rules, written out in full: a changed pattern must show in a plan."""
    out = []
    for t in r.tool_rules:
        args = "; ".join(f"{a.name} {_argument(a)}" for a in t.arguments)
        extra = "any others" if t.additional_arguments else "no others"
        out.append(f"{t.name}({args}; required {','.join(t.required) or 'none'}; {extra})")
    return " ".join(out)


def _argument(a: ArgumentRule) -> str:
    keys = (
        ("const", a.const),
        ("enum", "|".join(a.enum) or None),
        ("pattern", a.pattern),
        ("prefix", a.prefix),
        ("maxLength", a.max_length),
        ("minimum", a.minimum),
        ("maximum", a.maximum),
    )
    return " ".join(f"{k}={v}" for k, v in keys if v is not None) or "any"


def _fields(old: dict[str, str], new: dict[str, str]) -> list[Detail]:
    out: list[Detail] = []
    for key in sorted(set(old) | set(new), key=list({**old, **new}).index):
        a, b = old.get(key), new.get(key)
        if a != b:
            out.append(Detail("change", key, a or "(unset)", b or "(unset)"))
    return out


def _mesh_fields(m: Mesh) -> dict[str, str]:
    out = {
        "name": m.name,
        "trustDomain": m.trust_domain,
        "egressGateway.listenPort": str(m.gateway_listen_port),
        "egressGateway.capacity": _concurrency(m.gateway_capacity),
        "secrets.provider": m.secrets.provider,
    }
    if m.secrets.path is not None:
        out["secrets.path"] = m.secrets.path
    for k, v in m.secrets.options:
        out[f"secrets.{k}"] = v
    if m.consul is not None:
        out["consul.address"] = m.consul.address
        for key, value in (
            ("consul.tokenSecret", m.consul.token_secret),
            ("consul.datacenter", m.consul.datacenter),
            ("consul.caFile", m.consul.ca_file),
        ):
            if value is not None:
                out[key] = value
    return out


def _destination_fields(d: Destination) -> dict[str, str]:
    out = {"host": d.host, "port": str(d.port), "tls": d.tls, "identity": d.identity}
    if d.address:
        out["address"] = f"{d.address[0]}:{d.address[1]}"
    if d.ca_file:
        out["caFile"] = d.ca_file
    if d.tls == "originate":
        out["intercept"] = str(d.intercept).lower()
    if d.credentials:
        out["credentials.header"] = d.credentials.header
        out["credentials.secret"] = d.credentials.secret
        out["credentials.format"] = "(set)"
    if d.labels:
        out["labels"] = ",".join(f"{k}={v}" for k, v in d.labels)
    if d.llm:
        out["llm.api"] = d.llm.api
        out["llm.prices"] = ", ".join(f"{p.model} {p.input}/{p.output}" for p in d.llm.prices)
    if d.concurrency:
        out["concurrency"] = _concurrency(d.concurrency)
    if d.consul:
        out["consul.service"] = d.consul.service
        if d.consul.tag is not None:
            out["consul.tag"] = d.consul.tag
        out["consul.passingOnly"] = "true" if d.consul.passing_only else "false"
    return out


def _destination_details(old: Destination, new: Destination) -> list[Detail]:
    details = _fields(_destination_fields(old), _destination_fields(new))
    formats = [c.format if c else None for c in (old.credentials, new.credentials)]
    if old.credentials and new.credentials and formats[0] != formats[1]:
        details.append(Detail("change", "credentials.format changed"))
    return details


def _keyed_rules(rules: tuple[EgressRule, ...]) -> dict[str, EgressRule]:
    """Rules keyed by destination and occurrence ("search", "search#2"), to pair old with new."""
    seen: dict[str, int] = {}
    out: dict[str, EgressRule] = {}
    for r in rules:
        name = r.destination if r.enforced else f"{r.destination} [shadow]"
        seen[name] = seen.get(name, 0) + 1
        n = seen[name]
        out[name if n == 1 else f"{name}#{n}"] = r
    return out


def _rule_fields(r: EgressRule) -> dict[str, str]:
    return {
        "methods": ",".join(r.methods) or "any",
        "paths": ",".join(r.paths) or "any",
        "headers": ",".join(_header(h.name, h.value) for h in r.headers) or "any",
        "tools": ",".join(r.tools) or "any",
        "tool arguments": _tool_rules(r),
        "rateLimit": _rate(r),
        "concurrency": _concurrency(r.concurrency),
        "models": ",".join(r.models) or "any",
        "maxTokens": str(r.max_tokens) if r.max_tokens is not None else "",
        "budgets": _budgets(r.budgets),
        "mode": r.mode,
    }


def _agent_details(old: AgentPolicy | None, new: AgentPolicy | None) -> list[Detail]:
    details: list[Detail] = []
    if old and new and old.name != new.name:
        details.append(Detail("change", "policy", old.name, new.name))
    for label, was, now in (
        ("budgets", old.budgets if old else (), new.budgets if new else ()),
        (
            "group budgets",
            tuple(g.budget for g in old.group_budgets) if old else (),
            tuple(g.budget for g in new.group_budgets) if new else (),
        ),
    ):
        if was != now:
            details.append(
                Detail("change", label, _budgets(was) or "(unset)", _budgets(now) or "(unset)")
            )
    before = _keyed_rules(old.rules) if old else {}
    after = _keyed_rules(new.rules) if new else {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a is None and b is not None:
            details.append(Detail("add", f"rule {describe_rule(b)}"))
        elif b is None and a is not None:
            details.append(Detail("remove", f"rule {describe_rule(a)}"))
        elif a is not None and b is not None and a != b:
            changed = _fields(_rule_fields(a), _rule_fields(b))
            text = "; ".join(f"{d.subject} {d.before} -> {d.after}" for d in changed)
            details.append(Detail("change", f"rule {key}: {text}"))
    if old and new and not details and old.rules != new.rules:
        details.append(Detail("change", "rule order changed"))
    return details


def diff_policies(old: PolicyModel | None, new: PolicyModel) -> Plan:
    changes: list[Change] = []
    if old is None:
        changes.append(_added("mesh", new.mesh.name, _mesh_fields(new.mesh)))
    elif old.mesh != new.mesh:
        details = _fields(_mesh_fields(old.mesh), _mesh_fields(new.mesh))
        changes.append(Change("change", "mesh", new.mesh.name, tuple(details)))

    old_d = {d.name: d for d in old.destinations} if old else {}
    new_d = {d.name: d for d in new.destinations}
    for name in sorted(set(old_d) | set(new_d)):
        a, b = old_d.get(name), new_d.get(name)
        if a is None and b is not None:
            changes.append(_added("destination", name, _destination_fields(b)))
        elif b is None:
            changes.append(Change("remove", "destination", name))
        elif a != b and a is not None:
            details = _destination_details(a, b)
            changes.append(Change("change", "destination", name, tuple(details)))

    for suffix, was, now in (
        ("", old.agents if old else (), new.agents),
        (" (shadow)", old.shadow_agents if old else (), new.shadow_agents),
    ):
        old_a = {a.agent: a for a in was}
        new_a = {a.agent: a for a in now}
        for agent in sorted(set(old_a) | set(new_a)):
            pa, pb = old_a.get(agent), new_a.get(agent)
            if pa == pb:
                continue
            action: Action = "add" if pa is None else "remove" if pb is None else "change"
            details = _agent_details(pa, pb) if action != "remove" else []
            changes.append(Change(action, "agent", agent + suffix, tuple(details)))
    return Plan(old.version if old else None, new.version, tuple(changes))


def _added(kind: Literal["mesh", "destination"], name: str, fields: dict[str, str]) -> Change:
    return Change("add", kind, name, tuple(Detail("add", k, None, v) for k, v in fields.items()))


def render_plan_text(plan: Plan) -> str:
    lines = [f"Policy {plan.old_version or '(none)'} -> {plan.new_version}", ""]
    for c in plan.changes:
        lines.append(f"{_SIGN[c.action]} {c.kind} {c.name}")
        lines += [f"    {_SIGN[d.action]} {d.text()}" for d in c.details]
    if not plan.changes:
        lines.append("No changes.")
    else:
        lines += [
            "",
            f"Plan: {plan.count('add')} to add, {plan.count('change')} to change, "
            f"{plan.count('remove')} to remove.",
        ]
    return "\n".join(lines) + "\n"


def plan_to_json(plan: Plan) -> dict[str, Any]:
    return {
        "old_version": plan.old_version,
        "new_version": plan.new_version,
        "summary": {a: plan.count(a) for a in ("add", "change", "remove")},
        "changes": [
            {
                "action": c.action,
                "kind": c.kind,
                "name": c.name,
                "details": [
                    {"action": d.action, "subject": d.subject, "before": d.before, "after": d.after}
                    for d in c.details
                ],
            }
            for c in plan.changes
        ],
    }

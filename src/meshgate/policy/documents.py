"""Validate one YAML document against its kind's schema; turn pydantic errors into Problems.

pydantic reports `loc` paths like ("spec", "egress", 0, "rateLimit", "per"); we look that path up
in the document's position index and phrase the message for a human ("unknown field", "expected a
string, got a number", `rateLimit.per "1y": unit must be one of s, m, h, d`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from meshgate.policy import schema, syntax
from meshgate.policy.problems import Problem, describe, show
from meshgate.policy.yamlsource import Path, YamlDoc


@dataclass(frozen=True)
class CheckedDoc:
    """A document whose kind is known. `model` is None when its schema check failed; `name` is
    still set when metadata.name was readable, so duplicates and references can be checked."""

    kind: str
    name: str | None
    source: YamlDoc
    model: schema.AnyDoc | None


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}

_PLURAL_ITEM = {
    "egress": "egress rule",
    "headers": "header match",
    "budgets": "budget",
    "tools": "tool entry",
}
_UNION_TAGS = ("file", "env", "vault", "[key]", schema.TOOL_NAME_TAG, schema.TOOL_OBJECT_TAG)


def check_document(doc: YamlDoc) -> tuple[CheckedDoc | None, list[Problem]]:
    data = doc.data
    if not isinstance(data, dict):
        return None, [
            Problem(
                doc.start,
                f"a policy document must be a mapping with apiVersion, kind, metadata and spec, "
                f"got {describe(data)}",
            )
        ]
    if "kind" not in data:
        return None, [Problem(doc.start, 'missing required field "kind"')]
    kind = data["kind"]
    if not isinstance(kind, str) or kind not in schema.DOC_MODELS:
        return None, [
            Problem(
                doc.key_pos(("kind",)),
                f"unknown kind {show(kind)} (expected one of {', '.join(schema.KINDS)})",
            )
        ]
    name = _readable_name(data)
    try:
        model = schema.DOC_MODELS[kind].model_validate(data)
    except ValidationError as e:
        problems = [_problem(doc, kind, err) for err in e.errors(include_url=False)]
        return CheckedDoc(kind, name, doc, None), problems
    return CheckedDoc(kind, model.metadata.name, doc, model), []


def _readable_name(data: dict[str, Any]) -> str | None:
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str):
        return None
    try:
        return syntax.name(name)
    except Exception:
        return None


def _real_path(data: Any, loc: tuple[int | str, ...]) -> tuple[Path, list[int | str]]:
    """Follow `loc` through the data; parts that aren't there (union tags, a missing key) are
    returned separately, so we can point at the deepest thing that exists."""
    path: list[int | str] = []
    rest: list[int | str] = []
    node = data
    for part in loc:
        if rest:
            rest.append(part)
        elif _has(node, part):
            path.append(part)
            node = node[part]
        elif part in _UNION_TAGS:
            continue  # a discriminated-union tag or dict-key marker pydantic inserts
        else:
            rest.append(part)
    return tuple(path), rest


def _has(node: Any, part: int | str) -> bool:
    if isinstance(node, dict):
        return isinstance(part, str) and part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def label(path: Path) -> str:
    """`rateLimit.per`, `methods[1]`, `metadata.name`: the path from the nearest thing a line
    number already identifies (the spec, or the egress rule)."""
    parts = list(path)
    if parts[:1] == ["spec"]:
        parts = parts[1:]
        if len(parts) >= 2 and parts[0] == "egress" and isinstance(parts[1], int):
            parts = parts[2:]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _context(kind: str, parent: Path) -> str:
    if not parent:
        return f"{kind} document"
    last = parent[-1]
    if len(parent) >= 2 and parent[-2] == "arguments":
        return "argument rule"
    if isinstance(last, int):
        before = parent[-2] if len(parent) >= 2 else ""
        return _PLURAL_ITEM.get(str(before), f"{before} item")
    if parent in (("spec",), ("metadata",)):
        return f"{kind} {last}"
    return str(last)


def _allowed_fields(kind: str, context: str, data: Any) -> list[str]:
    models: dict[str, list[type[Any]]] = {
        f"{kind} document": [schema.DOC_MODELS[kind]],
        f"{kind} metadata": [schema.Metadata],
        "Mesh spec": [schema.MeshSpec],
        "Destination spec": [schema.DestinationSpec],
        "AgentPolicy spec": [schema.AgentPolicySpec],
        "AgentGroup spec": [schema.AgentGroupSpec],
        "DefaultPolicy spec": [schema.DefaultPolicySpec],
        "egress rule": [schema.RuleDoc],
        "rateLimit": [schema.RateLimitDoc],
        "concurrency": [schema.ConcurrencyDoc],
        "capacity": [schema.ConcurrencyDoc],
        "budget": [schema.BudgetDoc],
        "llm": [schema.LlmDoc],
        "header match": [schema.HeaderDoc],
        "tool entry": [schema.ToolDoc],
        "argument rule": [schema.ArgumentDoc],
        "credentials": [schema.CredentialsDoc],
        "egressGateway": [schema.GatewayDoc],
        "secrets": [_secrets_model(data)],
        "consul": [schema.ConsulMeshDoc if kind == "Mesh" else schema.ConsulServiceDoc],
    }
    names: list[str] = []
    for model in models.get(context, []):
        names += schema.field_names(model)
    return names


def _secrets_model(data: Any) -> type[Any]:
    spec = data.get("spec") if isinstance(data, dict) else None
    secrets = spec.get("secrets") if isinstance(spec, dict) else None
    provider = secrets.get("provider") if isinstance(secrets, dict) else None
    return schema.EnvSecretsDoc if provider == "env" else schema.FileSecretsDoc


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _problem(doc: YamlDoc, kind: str, err: ErrorDetails) -> Problem:
    loc = tuple(err["loc"])
    path, rest = _real_path(doc.data, loc)
    typ = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}

    if typ == "missing" or (typ == "union_tag_not_found" and not rest):
        field = str(rest[-1]) if typ == "missing" and rest else str(ctx.get("discriminator", ""))
        field = field.strip("'")
        return Problem(
            doc.key_pos(path), f'missing required field "{field}" in {_context(kind, path)}'
        )
    if typ == "extra_forbidden":
        field = str(path[-1])
        context = _context(kind, path[:-1])
        allowed = _allowed_fields(kind, context, doc.data)
        hint = did_you_mean(field, [f for f in allowed if f != field])
        return Problem(doc.key_pos(path), f'unknown field "{field}" in {context}{hint}')
    if typ == "union_tag_invalid":
        expected = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected_tags", ""))))
        tag_path = (*path, "provider")
        return Problem(
            doc.value_pos(tag_path),
            f"{label(tag_path)} {show(ctx.get('tag'))}: must be one of {expected}",
        )
    where = doc.value_pos(path)
    name = label(path) or "document"
    if typ == "literal_error" and path == ("apiVersion",):
        return Problem(
            where, f"unsupported apiVersion {show(value)} (expected {schema.API_VERSION})"
        )
    if typ == "literal_error":
        expected = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
        return Problem(where, f"{name} {show(value)}: must be one of {expected}")
    if typ in _EXPECTED:
        return Problem(where, f"{name}: expected {_EXPECTED[typ]}, got {describe(value)}")
    if typ == "meshgate" and isinstance(value, str | int | float) and not isinstance(value, bool):
        return Problem(where, f"{name} {show(value)}: {err['msg']}")
    return Problem(where, f"{name}: {err['msg']}")

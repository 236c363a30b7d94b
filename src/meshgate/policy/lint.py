"""Guardrails over a compiled policy: valid-but-risky patterns a team may want to forbid in CI.

Each check has a stable id (MG001...), a name and a default severity; a lint config can disable
checks or change severities: `{disable: [MG005], severity: {MG002: warning}}` (ids or names).
Locations come from the `SourceMap` that `load_policy_*_with_locations` returns next to the
model (the model itself carries no line numbers); without one, findings name the object instead.
The lint config is not a policy document: keep it outside the policy dir, or in a hidden file
such as `<policy dir>/.meshgate-lint.yaml`, which the loader skips.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meshgate.errors import ConfigError
from meshgate.policy.compile import SourceMap
from meshgate.policy.model import Destination, PolicyModel
from meshgate.policy.syntax import SECRET_PLACEHOLDER

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Check:
    id: str
    name: str
    severity: Severity
    summary: str


CHECKS: tuple[Check, ...] = (
    Check("MG001", "wildcard-host", "warning", "destinations should name exact hosts"),
    Check("MG002", "unlimited-rule", "warning", "every egress rule should have a rateLimit"),
    Check("MG003", "inline-credential", "error", "credentials.format must not hold a secret"),
    Check("MG004", "plaintext-public", "error", "tls: none only to private or local hosts"),
    Check("MG005", "passthrough", "warning", "passthrough destinations are host-only"),
    Check("MG006", "unused-destination", "warning", "a destination no agent may reach"),
)
_BY_KEY = {c.id: c for c in CHECKS} | {c.name: c for c in CHECKS}

PRIVATE_SUFFIXES = (".internal", ".local", ".svc", ".cluster.local", ".consul")
_SECRET_PREFIXES = (
    "sk-",
    "sk_",
    "ghp_",
    "gho_",
    "ghs_",
    "github_pat_",
    "xoxb-",
    "xoxp-",
    "glpat-",
    "AKIA",
    "AIza",
    "eyJ",
)
_TOKENISH = re.compile(r"[A-Za-z0-9+/_=.~-]{20,}")


@dataclass(frozen=True)
class LintConfig:
    disable: frozenset[str] = frozenset()
    severity: Mapping[str, Severity] = field(default_factory=dict)


@dataclass(frozen=True, order=True)
class Finding:
    location: str
    id: str
    name: str
    severity: Severity
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.severity} {self.id} {self.name}: {self.message}"


def lint_config_from_mapping(data: Any) -> LintConfig:
    """Validate a parsed lint config; unknown ids or severities raise ConfigError."""
    if data is None:
        return LintConfig()
    if not isinstance(data, Mapping):
        raise ConfigError("lint config: expected a mapping with 'disable' and/or 'severity'")
    unknown = set(data) - {"disable", "severity"}
    if unknown:
        raise ConfigError(f"lint config: unknown field {sorted(map(str, unknown))[0]!r}")
    disable = data.get("disable") or []
    severity = data.get("severity") or {}
    if not isinstance(disable, list) or not isinstance(severity, Mapping):
        raise ConfigError("lint config: 'disable' must be a list and 'severity' a mapping")
    ids = {_check_id(k) for k in disable}
    levels: dict[str, Severity] = {}
    for key, level in severity.items():
        if level not in ("error", "warning"):
            raise ConfigError(f"lint config: severity of {key} must be error or warning")
        levels[_check_id(key)] = "error" if level == "error" else "warning"
    return LintConfig(frozenset(ids), levels)


def load_lint_config(path: Path) -> LintConfig:
    """Read a lint config YAML file; a missing file means the defaults."""
    from ruamel.yaml import YAML

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return LintConfig()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read lint config: {e}") from None
    try:
        data = YAML(typ="safe").load(text)
    except Exception as e:
        # `file:line:col: problem`, as policy errors are (ruamel's marks count from 0)
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{where}: invalid YAML in lint config: {what}") from None
    return lint_config_from_mapping(data)


def _check_id(key: object) -> str:
    check = _BY_KEY.get(str(key))
    if check is None:
        raise ConfigError(f"lint config: unknown check {key!r} (known: MG001..MG{len(CHECKS):03})")
    return check.id


def is_private_host(host: str) -> bool:
    """localhost, private/loopback/link-local IPs, and conventional internal DNS suffixes."""
    h = host.lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return h.endswith(PRIVATE_SUFFIXES)
    return ip.is_private or ip.is_loopback or ip.is_link_local


def looks_like_inline_secret(fmt: str) -> bool:
    rest = fmt.replace(SECRET_PLACEHOLDER, " ")
    for word in rest.split():
        if word.startswith(_SECRET_PREFIXES) and len(word) >= 8:
            return True
        if _TOKENISH.fullmatch(word) and any(c.isdigit() for c in word):
            return True
    return False


def lint_policy(
    model: PolicyModel, config: LintConfig | None = None, sources: SourceMap | None = None
) -> list[Finding]:
    """Every finding not disabled by `config`, sorted by location then id."""
    config = config or LintConfig()
    src = sources or SourceMap()
    raw: list[tuple[str, str, str]] = []  # (check id, location, message)

    def dest_loc(d: Destination) -> str:
        return src.destinations.get(d.name, f"destination {d.name}")

    for d in model.destinations:
        if d.host.startswith("*."):
            raw.append(
                (
                    "MG001",
                    dest_loc(d),
                    f'destination "{d.name}" uses wildcard host '
                    f'"{d.host}"; list the exact hosts agents need',
                )
            )
        if d.credentials and looks_like_inline_secret(d.credentials.format):
            raw.append(
                (
                    "MG003",
                    dest_loc(d),
                    f'credentials.format of destination "{d.name}" '
                    'seems to contain a literal secret; keep only "{secret}" and store the '
                    "value in the secret provider",
                )
            )
        target = d.address[0] if d.address else d.host
        if d.consul is not None:  # instances from the Consul catalogue: an internal registry
            target = f"{d.consul.service}.service.consul"
        if d.tls == "none" and not is_private_host(target):
            raw.append(
                (
                    "MG004",
                    dest_loc(d),
                    f'destination "{d.name}" sends plaintext (tls: none) '
                    f'to "{target}", which is not a private or local host',
                )
            )
        if d.tls == "passthrough":
            raw.append(
                (
                    "MG005",
                    dest_loc(d),
                    f'destination "{d.name}" uses tls: passthrough: '
                    "rules can restrict only the host, not methods, paths or tools",
                )
            )
    used = {r.destination for a in model.agents for r in a.rules}
    for d in model.destinations:
        if d.name not in used:
            raw.append(
                ("MG006", dest_loc(d), f'destination "{d.name}" is not reachable by any agent')
            )
    for a in model.agents:
        for i, r in enumerate(a.rules):
            if r.rate_limit is None:
                loc = src.rules.get((a.agent, i), f"agent {a.agent}")
                raw.append(
                    (
                        "MG002",
                        loc,
                        f'rule {i + 1} of agent "{a.agent}" to "{r.destination}" has no rateLimit',
                    )
                )

    findings = set()
    for check_id, loc, message in raw:
        if check_id in config.disable:
            continue
        check = _BY_KEY[check_id]
        level = config.severity.get(check_id, check.severity)
        findings.add(Finding(loc, check.id, check.name, level, message))
    return sorted(findings, key=_order)


def _order(f: Finding) -> tuple[str, int, str, str]:
    file, _, line = f.location.rpartition(":")
    if file and line.isdigit():
        return (file, int(line), f.id, f.message)
    return (f.location, 0, f.id, f.message)


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)

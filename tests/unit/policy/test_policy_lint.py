# ruff: noqa: E501  (inline YAML fixtures and exact messages read best unwrapped)
"""Lint guardrails MG001-MG006 and their configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_texts import HEAD, R, agent, base

from meshgate.errors import ConfigError
from meshgate.policy.lint import (
    Finding,
    LintConfig,
    has_errors,
    is_private_host,
    lint_config_from_mapping,
    lint_policy,
    load_lint_config,
    looks_like_inline_secret,
)
from meshgate.policy.loader import load_policy_dir_with_locations, load_policy_texts_with_locations

REPO = Path(__file__).resolve().parents[3]


def dest(name: str, body: str) -> str:
    return f"{HEAD}kind: Destination\nmetadata: {{name: {name}}}\nspec:\n{body}"


def lint(config: LintConfig | None = None, **files: str) -> list[Finding]:
    loaded = load_policy_texts_with_locations(base(**files))
    return lint_policy(loaded.model, config, loaded.sources)


LIMITED = "      rateLimit: {requests: 1, per: 1s}\n"
# search-api is reachable and limited; raw (passthrough) is reachable too
CLEAN = agent("researcher", R + LIMITED + "    - destination: raw\n" + LIMITED)


def test_example_policies_are_lint_clean() -> None:
    loaded = load_policy_dir_with_locations(REPO / "policies")
    assert lint_policy(loaded.model, None, loaded.sources) == []


def test_baseline_only_warns_about_passthrough() -> None:
    assert [(f.location, f.id, f.severity) for f in lint(agents=CLEAN)] == [
        ("p/dest.yaml:8", "MG005", "warning")
    ]


def test_mg001_wildcard_host() -> None:
    d = dest("w", "  host: '*.example.com'\n  port: 443\n")
    found = [f for f in lint(agents=CLEAN, w=d) if f.id == "MG001"]
    assert found == [
        Finding(
            "p/w.yaml:1",
            "MG001",
            "wildcard-host",
            "warning",
            'destination "w" uses wildcard host "*.example.com"; list the exact hosts agents need',
        )
    ]


def test_mg002_unlimited_rule_points_at_the_rule() -> None:
    a = agent("researcher", R + "      methods: [GET]\n" + "    - destination: raw\n" + LIMITED)
    found = [f for f in lint(agents=a) if f.id == "MG002"]
    assert [(f.location, f.severity, f.message) for f in found] == [
        (
            "p/agents.yaml:7",
            "warning",
            'rule 1 of agent "researcher" to "search-api" has no rateLimit',
        )
    ]


@pytest.mark.parametrize(
    ("fmt", "inline"),
    [
        ("{secret}", False),
        ("Bearer {secret}", False),
        ("Token token={secret}", False),
        ("Bearer sk-live-abc123 {secret}", True),
        ("{secret} ghp_abcdefgh1234", True),
        ("Basic dXNlcjpwYXNzd29yZDEyMzQ1Njc4OTA= {secret}", True),
    ],
)
def test_inline_secret_detection(fmt: str, inline: bool) -> None:
    assert looks_like_inline_secret(fmt) is inline


def test_mg003_inline_credential_is_an_error_and_hides_the_value() -> None:
    d = dest(
        "k",
        '  host: k.example\n  port: 443\n  credentials: {header: A, secret: k, format: "sk-abcdef123456 {secret}"}\n',
    )
    a = agent(
        "researcher",
        R + LIMITED + "    - destination: raw\n" + LIMITED + "    - destination: k\n" + LIMITED,
    )
    found = [f for f in lint(agents=a, k=d) if f.id == "MG003"]
    assert [(f.location, f.severity) for f in found] == [("p/k.yaml:1", "error")]
    assert "sk-abcdef" not in found[0].message


@pytest.mark.parametrize(
    ("host", "private"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("192.168.0.9", True),
        ("172.16.0.1", True),
        ("mcp.internal", True),
        ("db.svc", True),
        ("api.default.svc.cluster.local", True),
        ("vault.service.consul", True),
        ("printer.local", True),
        ("8.8.8.8", False),
        ("api.example.com", False),
        ("internal.example.com", False),
    ],
)
def test_private_hosts(host: str, private: bool) -> None:
    assert is_private_host(host) is private


def test_mg004_plaintext_public_uses_the_real_address() -> None:
    public = dest("pub", "  host: api.example.com\n  port: 80\n  tls: none\n")
    via_local = dest(
        "loc", "  host: mcp.tools\n  port: 80\n  tls: none\n  address: 127.0.0.1:8931\n"
    )
    rules = "".join(f"    - destination: {n}\n" + LIMITED for n in ("raw", "pub", "loc"))
    found = [
        f
        for f in lint(agents=agent("researcher", R + LIMITED + rules), pub=public, loc=via_local)
        if f.id == "MG004"
    ]
    assert [(f.location, f.severity, f.message) for f in found] == [
        (
            "p/pub.yaml:1",
            "error",
            'destination "pub" sends plaintext (tls: none) to "api.example.com", which is not a private or local host',
        )
    ]


def test_mg006_unused_destination() -> None:
    found = [f for f in lint(agents=agent("researcher", R + LIMITED)) if f.id == "MG006"]
    assert [(f.location, f.message) for f in found] == [
        ("p/dest.yaml:8", 'destination "raw" is not reachable by any agent')
    ]


def test_config_disables_and_changes_severity() -> None:
    a = agent("researcher", R)  # unlimited rule, raw unused and passthrough
    assert {f.id for f in lint(agents=a)} == {"MG002", "MG005", "MG006"}
    config = lint_config_from_mapping(
        {"disable": ["MG005", "unused-destination"], "severity": {"MG002": "error"}}
    )
    found = lint(config, agents=a)
    assert [(f.id, f.severity) for f in found] == [("MG002", "error")]
    assert has_errors(found)
    assert not has_errors(lint(agents=a))


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"disable": ["MG999"]},
        {"severity": {"MG001": "fatal"}},
        {"ignore": []},
        {"disable": "MG001"},
    ],
)
def test_bad_lint_config(bad: object) -> None:
    with pytest.raises(ConfigError):
        lint_config_from_mapping(bad)


def test_load_lint_config_file(tmp_path: Path) -> None:
    f = tmp_path / ".meshgate-lint.yaml"
    assert load_lint_config(f) == LintConfig()
    f.write_text("disable: [MG005]\nseverity: {wildcard-host: error}\n")
    assert load_lint_config(f) == LintConfig(frozenset({"MG005"}), {"MG001": "error"})
    f.write_text("disable: [")
    with pytest.raises(ConfigError):
        load_lint_config(f)


def test_findings_without_source_map_name_the_object() -> None:
    loaded = load_policy_texts_with_locations(base(agents=agent("researcher", R)))
    found = lint_policy(loaded.model)
    assert {f.location for f in found} == {"destination raw", "agent researcher"}


def test_a_lint_config_with_a_yaml_error_names_file_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / ".meshgate-lint.yaml"
    config.write_text("disable: [MG001\nseverity: {a: b}\n")
    with pytest.raises(ConfigError) as caught:
        load_lint_config(config)
    assert str(caught.value).startswith(f"{config}:2:9: invalid YAML in lint config: ")
    assert "<unicode string>" not in str(caught.value)

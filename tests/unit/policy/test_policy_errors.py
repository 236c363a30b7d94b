# ruff: noqa: E501  (exact user-facing messages are long; wrapping them would hide typos)
"""Invalid policies: each case asserts the exact `file:line:col: message` lines a user sees."""

from __future__ import annotations

import pytest
from policy_texts import DESTS, HEAD, MESH, agent, base, problems

from meshgate.errors import PolicyError
from meshgate.policy.loader import load_policy_texts

D = HEAD + "kind: Destination\nmetadata: {name: d1}\nspec:\n"
R = "    - destination: search-api\n"

CASES = [
    pytest.param(
        {"a": HEAD + "kind: Agnet\nmetadata: {name: x}\nspec: {}\n"},
        [
            'p/a.yaml:2:1: unknown kind "Agnet" (expected one of AgentGroup, AgentPolicy, DefaultPolicy, Destination, Mesh)'
        ],
        id="unknown-kind",
    ),
    pytest.param(
        {"a": HEAD + "metadata: {name: x}\n"},
        ['p/a.yaml:1:1: missing required field "kind"'],
        id="missing-kind",
    ),
    pytest.param(
        {"a": "- 1\n- 2\n"},
        [
            "p/a.yaml:1:1: a policy document must be a mapping with apiVersion, kind, metadata and spec, got a list"
        ],
        id="doc-is-list",
    ),
    pytest.param(
        {"a": "# comment\n---\nhello\n"},
        [
            "p/a.yaml:3:1: a policy document must be a mapping with apiVersion, kind, metadata and spec, got a string"
        ],
        id="doc-is-scalar",
    ),
    pytest.param(
        {
            "a": "apiVersion: meshgate.dev/v2\nkind: Destination\nmetadata: {name: d1}\nspec: {host: a.example, port: 1}\n"
        },
        ['p/a.yaml:1:13: unsupported apiVersion "meshgate.dev/v2" (expected meshgate.dev/v1)'],
        id="bad-api-version",
    ),
    pytest.param(
        {"a": HEAD + "kind: Destination\nspec: {host: a.example, port: 1}\n"},
        ['p/a.yaml:1:1: missing required field "metadata" in Destination document'],
        id="missing-metadata",
    ),
    pytest.param(
        {
            "a": HEAD
            + "kind: Destination\nmetadata: {name: Search_API}\nspec: {host: a.example, port: 1}\n"
        },
        [
            "p/a.yaml:3:18: metadata.name \"Search_API\": must be a DNS label: lower-case letters, digits and '-', at most 63 characters, starting and ending with a letter or digit"
        ],
        id="bad-name",
    ),
    pytest.param(
        {
            "a": HEAD
            + "kind: Destination\nmetadata:\n  name: d1\n  label: {a: b}\nspec: {host: a.example, port: 1}\n"
        },
        ['p/a.yaml:5:3: unknown field "label" in Destination metadata (did you mean "labels"?)'],
        id="unknown-metadata-field",
    ),
    pytest.param(
        {"a": D + "  hots: a.example\n  port: 443\n"},
        [
            'p/a.yaml:4:1: missing required field "host" in Destination spec',
            'p/a.yaml:5:3: unknown field "hots" in Destination spec (did you mean "host"?)',
        ],
        id="typo-field",
    ),
    pytest.param(
        {"a": D + '  host: a.example\n  port: "443"\n'},
        ["p/a.yaml:6:9: port: expected an integer, got a string"],
        id="port-string",
    ),
    pytest.param(
        {"a": D + "  host: a.example\n  port: 0\n"},
        ["p/a.yaml:6:9: port 0: must be between 1 and 65535"],
        id="port-zero",
    ),
    pytest.param(
        {"a": D + "  host: a.example\n  port: " + "9" * 40 + "\n"},
        ["p/a.yaml:6:9: port <very large number>: must be between 1 and 65535"],
        id="port-huge",
    ),
    pytest.param(
        {"a": D + "  host: a.example\n  port: 443\n  tls: mtls\n"},
        ['p/a.yaml:7:8: tls "mtls": must be one of originate, passthrough, none'],
        id="tls-invalid",
    ),
    pytest.param(
        {"a": D + "  host: a.example\n  port: 443\n  address: 10.0.0.7\n"},
        ['p/a.yaml:7:12: address "10.0.0.7": must be host:port, like 10.0.0.7:8443'],
        id="address-no-port",
    ),
    pytest.param(
        {"a": D + "  host: a.example\n  port: 443\n  address: 10.0.0.7:99999\n"},
        ['p/a.yaml:7:12: address "10.0.0.7:99999": port part must be between 1 and 65535'],
        id="address-bad-port",
    ),
    pytest.param(
        {"a": D + "  host: a.example\n  port: 80\n  tls: none\n  caFile: ./ca.pem\n"},
        [
            "p/a.yaml:8:3: caFile is only valid with tls: originate (this destination uses tls: none)"
        ],
        id="cafile-without-originate",
    ),
    pytest.param(
        {
            "a": D
            + "  host: a.example\n  port: 443\n  tls: passthrough\n  credentials: {header: Authorization, secret: k}\n"
        },
        [
            "p/a.yaml:8:3: credentials cannot be used with tls: passthrough (the gateway cannot add headers to encrypted traffic)"
        ],
        id="credentials-passthrough",
    ),
    pytest.param(
        {
            "a": D
            + '  host: a.example\n  port: 443\n  credentials: {header: Authorization, secret: k, format: "Bearer sk-abc"}\n'
        },
        ["p/a.yaml:7:59: credentials.format: must contain {secret} exactly once"],
        id="format-no-placeholder",
    ),
    pytest.param(
        {
            "a": D
            + '  host: a.example\n  port: 443\n  credentials:\n    header: Authorization\n    secret: k\n    format: "{secret}{secret}"\n'
        },
        ["p/a.yaml:10:13: credentials.format: must contain {secret} exactly once"],
        id="format-two-placeholders",
    ),
    pytest.param(
        {
            "a": D
            + '  host: a.example\n  port: 443\n  credentials: {header: "Auth: x", secret: k}\n'
        },
        ['p/a.yaml:7:25: credentials.header "Auth: x": is not a valid HTTP header name'],
        id="credentials-bad-header",
    ),
    pytest.param(
        {
            "a": D
            + "  host: a.example\n  port: 443\n  credentials: {header: Authorization, secret: ../etc/passwd}\n"
        },
        [
            "p/a.yaml:7:48: credentials.secret \"../etc/passwd\": must be letters, digits, '.', '_' or '-' (no '/'), starting and ending with a letter or digit"
        ],
        id="credentials-bad-secret-name",
    ),
    pytest.param(
        {"a": D + "  host: a.example\n  port: 443\n  tls: passthrough\n  identity: jwt\n"},
        [
            "p/a.yaml:8:3: identity: jwt cannot be used with tls: passthrough (the gateway cannot add headers to encrypted traffic)"
        ],
        id="jwt-passthrough",
    ),
    pytest.param(
        {"a": D + "  host: a.example\n  port: 443\n  identity: mtls\n"},
        ['p/a.yaml:7:13: identity "mtls": must be one of none, jwt'],
        id="identity-invalid",
    ),
    pytest.param(
        {"a": D + "  host: https://a.example\n  port: 443\n"},
        ['p/a.yaml:5:9: host "https://a.example": must be a bare host name, not a URL'],
        id="host-url",
    ),
    pytest.param(
        {"a": D + "  host: a.example:443\n  port: 443\n"},
        ['p/a.yaml:5:9: host "a.example:443": must not include a port; use the port field'],
        id="host-with-port",
    ),
    pytest.param(
        {"a": D + "  host: api.*.example\n  port: 443\n"},
        [
            'p/a.yaml:5:9: host "api.*.example": a wildcard is only allowed as the whole first label, like "*.example.com"'
        ],
        id="host-inner-wildcard",
    ),
    pytest.param(
        {"a": D + "  host: search.tools.example\n  port: 443\n"},
        [
            'p/dest.yaml:5:9: host "search.tools.example" port 443 is already used by destination "d1" (at p/a.yaml:5:9)'
        ],
        id="duplicate-endpoint",
    ),
    pytest.param(
        {
            "a": HEAD
            + "kind: Destination\nmetadata: {name: raw}\nspec: {host: other.example, port: 443}\n"
        },
        ['p/dest.yaml:10:18: duplicate Destination name "raw" (first defined at p/a.yaml:3:18)'],
        id="duplicate-destination-name",
    ),
    pytest.param(
        {"agents": agent("researcher", "    - destination: gh\n")},
        ['p/agents.yaml:7:7: unknown destination "gh"'],
        id="unknown-destination",
    ),
    pytest.param(
        {"agents": agent("researcher", "    - destination: search-apj\n")},
        ['p/agents.yaml:7:7: unknown destination "search-apj" (did you mean "search-api"?)'],
        id="unknown-destination-hint",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      methods: [GET, post]\n")},
        [
            'p/agents.yaml:8:22: methods[1] "post": HTTP methods must be upper-case (did you mean "POST"?)'
        ],
        id="method-lowercase",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      methods: [FETCH]\n")},
        [
            'p/agents.yaml:8:17: methods[0] "FETCH": is not an HTTP method (expected one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH)'
        ],
        id="method-unknown",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      paths: [v1/search]\n")},
        ['p/agents.yaml:8:15: paths[0] "v1/search": must start with "/"'],
        id="path-relative",
    ),
    pytest.param(
        {"agents": agent("researcher", R + '      paths: ["/v1/*/docs"]\n')},
        [
            'p/agents.yaml:8:15: paths[0] "/v1/*/docs": "*" is only allowed at the end, as a prefix match like "/v1/*"'
        ],
        id="path-inner-star",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      methods: []\n")},
        ["p/agents.yaml:8:16: methods: must not be empty (omit it to allow any method)"],
        id="methods-empty",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      methods: [GET, POST, GET]\n")},
        ['p/agents.yaml:8:28: methods[2] "GET" is listed twice'],
        id="method-twice",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      rateLimit: {requests: 10, per: 1y}\n")},
        ['p/agents.yaml:8:38: rateLimit.per "1y": unit must be one of s, m, h, d'],
        id="per-bad-unit",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      rateLimit: {requests: 10, per: 0m}\n")},
        ['p/agents.yaml:8:38: rateLimit.per "0m": count must be at least 1'],
        id="per-zero",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      rateLimit: {requests: 10, per: fast}\n")},
        ['p/agents.yaml:8:38: rateLimit.per "fast": must be <count><unit>, like 1m, 10s, 1h or 1d'],
        id="per-words",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      rateLimit: {requests: 0, per: 1m}\n")},
        ["p/agents.yaml:8:29: rateLimit.requests 0: must be at least 1"],
        id="requests-zero",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      rateLimit: {requests: 10, per: 60}\n")},
        ["p/agents.yaml:8:38: rateLimit.per: expected a string, got a number"],
        id="per-int",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      rateLimit:\n        per: 1m\n")},
        ['p/agents.yaml:8:7: missing required field "requests" in rateLimit'],
        id="requests-missing",
    ),
    pytest.param(
        {"agents": agent("researcher", "    - destinaton: search-api\n")},
        [
            'p/agents.yaml:7:7: missing required field "destination" in egress rule',
            'p/agents.yaml:7:7: unknown field "destinaton" in egress rule (did you mean "destination"?)',
        ],
        id="rule-typo",
    ),
    pytest.param(
        {"agents": agent("researcher", "    - destination: raw\n      paths: [/v1/x]\n")},
        [
            'p/agents.yaml:8:7: paths cannot apply: destination "raw" uses tls: passthrough, so the gateway sees only the host'
        ],
        id="paths-on-passthrough",
    ),
    pytest.param(
        {"agents": agent("researcher", "    - destination: raw\n      tools: [web_search]\n")},
        [
            'p/agents.yaml:8:7: tools cannot apply: destination "raw" uses tls: passthrough, so the gateway sees only the host'
        ],
        id="tools-on-passthrough",
    ),
    pytest.param(
        {"agents": agent("researcher", R + R + "      methods: [GET]\n")},
        [
            'p/agents.yaml:8:7: unreachable rule for agent "researcher": the rule at p/agents.yaml:7:7 already allows all traffic to "search-api"'
        ],
        id="unreachable",
    ),
    pytest.param(
        {
            "agents": agent(
                "researcher",
                R + "      methods: [GET, POST]\n" + R + "      methods: [POST, GET]\n",
            )
        },
        [
            'p/agents.yaml:9:7: duplicate rule for agent "researcher": same as the rule at p/agents.yaml:7:7'
        ],
        id="duplicate-rule",
    ),
    pytest.param(
        {
            "agents": agent("researcher", "")
            + "---\n"
            + agent("other", "").replace("agent: other", "agent: researcher")
        },
        [
            'p/agents.yaml:11:10: agent "researcher" already has an AgentPolicy (at p/agents.yaml:5:10)'
        ],
        id="agent-twice",
    ),
    pytest.param(
        {
            "agents": agent("researcher", "")
            + "---\n"
            + HEAD
            + "kind: AgentGroup\nmetadata: {name: g}\nspec:\n  agents: [researcher, coder]\n  egress:\n"
            + R
        },
        [
            'p/agents.yaml:11:24: agent "coder" has no AgentPolicy (group rules apply only to agents declared with an AgentPolicy)'
        ],
        id="group-unknown-agent",
    ),
    pytest.param(
        {
            "agents": agent("researcher", "")
            + "---\n"
            + HEAD
            + "kind: AgentGroup\nmetadata: {name: g}\nspec:\n  agents: [researcher, researcher]\n"
        },
        ['p/agents.yaml:11:24: agent "researcher" is listed twice'],
        id="group-member-twice",
    ),
    pytest.param(
        {
            "a": HEAD
            + "kind: DefaultPolicy\nmetadata: {name: d1}\nspec: {egress: []}\n---\n"
            + HEAD
            + "kind: DefaultPolicy\nmetadata: {name: d2}\nspec: {egress: []}\n"
        },
        ["p/a.yaml:7:1: only one DefaultPolicy is allowed (another is defined at p/a.yaml:2:1)"],
        id="two-default-policies",
    ),
    pytest.param(
        {"a": MESH},
        ["p/mesh.yaml:2:1: only one Mesh is allowed (another is defined at p/a.yaml:2:1)"],
        id="two-meshes",
    ),
    pytest.param(
        {"mesh": MESH.replace("agents.example", "spiffe://agents")},
        [
            'p/mesh.yaml:5:16: trustDomain "spiffe://agents": must be a lower-case DNS name like agents.example'
        ],
        id="trust-domain-invalid",
    ),
    pytest.param(
        {"mesh": MESH + "  secrets: {provider: aws}\n"},
        ['p/mesh.yaml:6:23: secrets.provider "aws": must be one of file, env, vault'],
        id="secrets-provider-unknown",
    ),
    pytest.param(
        {"mesh": MESH + "  secrets:\n    provider: file\n"},
        ['p/mesh.yaml:6:3: missing required field "path" in secrets'],
        id="secrets-file-no-path",
    ),
    pytest.param(
        {"mesh": MESH + "  secrets: {provider: env, path: x}\n"},
        ['p/mesh.yaml:6:28: unknown field "path" in secrets'],
        id="secrets-env-extra",
    ),
    pytest.param(
        {
            "mesh": MESH
            + "  secrets:\n    provider: vault\n    address: https://vault:8200\n    auth: {method: token}\n"
        },
        ["p/mesh.yaml:9:11: secrets.auth: expected a string, got a mapping"],
        id="vault-nested-option",
    ),
    pytest.param(
        {"mesh": MESH + "  egressGateway: {listenPort: 70000}\n"},
        ["p/mesh.yaml:6:31: egressGateway.listenPort 70000: must be between 1 and 65535"],
        id="listen-port-range",
    ),
    pytest.param(
        {"agents": agent("researcher", "    destination: search-api\n")},
        ["p/agents.yaml:7:5: egress: expected a list, got a mapping"],
        id="egress-mapping",
    ),
    pytest.param(
        {"a": HEAD + "kind: Destination\nmetadata: {name: d1\nspec: {}\n"},
        [
            "p/a.yaml:4:5: YAML syntax error: expected ',' or '}', but got ':' (while parsing a flow mapping)"
        ],
        id="yaml-syntax",
    ),
    pytest.param(
        {"a": HEAD + "kind: Destination\n\tmetadata: {name: d1}\n"},
        [
            "p/a.yaml:3:1: YAML syntax error: found character '\\t' that cannot start any token (while scanning for the next token)"
        ],
        id="yaml-tab",
    ),
    pytest.param(
        {"a": D + "  host: a.example\n  host: b.example\n  port: 1\n"},
        ['p/a.yaml:6:3: duplicate key "host"'],
        id="duplicate-key",
    ),
    pytest.param(
        {"a": D + "  host: a.example\n  port: 1\n  80: x\n"},
        ["p/a.yaml:7:3: field names must be strings, got 80"],
        id="non-string-key",
    ),
    pytest.param(
        {"agents": agent("researcher", R + '      tools: ["web search"]\n')},
        [
            "p/agents.yaml:8:15: tools[0] \"web search\": must be 1-128 letters, digits, '_', '.' or '-'"
        ],
        id="tool-invalid",
    ),
    pytest.param(
        {"agents": agent("researcher", R + '      headers: [{name: "x team", value: a}]\n')},
        ['p/agents.yaml:8:24: headers[0].name "x team": is not a valid HTTP header name'],
        id="header-name-invalid",
    ),
    pytest.param(
        {"agents": agent("researcher", R + "      headers: [{name: x-team, valeu: a}]\n")},
        ['p/agents.yaml:8:32: unknown field "valeu" in header match (did you mean "value"?)'],
        id="header-field-typo",
    ),
    pytest.param(
        {
            "agents": agent("researcher", R)
            + "---\n"
            + HEAD
            + "kind: DefaultPolicy\nmetadata: {name: default}\nspec:\n  egress:\n"
            + R
            + "      methods: [GET]\n"
        },
        [
            'p/agents.yaml:14:7: unreachable rule for agent "researcher": the rule at p/agents.yaml:7:7 already allows all traffic to "search-api"'
        ],
        id="default-shadowed",
    ),
    pytest.param(
        {
            "a": D
            + "  host: a.example\n  port: 1\n  x0: &x0 [a, a, a, a, a, a, a, a, a, a]\n"
            + "".join(
                f"  x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]\n" for i in range(1, 8)
            )
        },
        ["p/a.yaml:1:1: document is too large (too many nodes or aliases)"],
        id="alias-bomb",
    ),
    pytest.param(
        {
            "a": HEAD
            + "kind: Destination\nmetadata: {name: d1, labels: {tier: 1}}\nspec: {host: a.example, port: 1}\n"
        },
        ["p/a.yaml:3:37: metadata.labels.tier: expected a string, got a number"],
        id="label-not-string",
    ),
    pytest.param(
        {"a": HEAD + "kind: Destination\nmetadata: {name: d1}\n"},
        ['p/a.yaml:1:1: missing required field "spec" in Destination document'],
        id="missing-spec",
    ),
    pytest.param(
        {"a": D + "  host:\n  port: 1\n"},
        ["p/a.yaml:5:3: host: expected a string, got null"],
        id="spec-null-host",
    ),
    pytest.param(
        {"a": D + "  host: a.example\n  port: true\n"},
        ["p/a.yaml:6:9: port: expected an integer, got a boolean"],
        id="bool-port",
    ),
]


@pytest.mark.parametrize(("extra", "expected"), CASES)
def test_invalid_policy_reports_exact_problems(extra: dict[str, str], expected: list[str]) -> None:
    assert problems(base(**extra)) == expected


def test_missing_mesh_is_reported_at_the_policy_root() -> None:
    files = {"p/dest.yaml": DESTS}
    assert problems(files) == ["p: no Mesh document found; exactly one is required"]


def test_missing_mesh_uses_the_root_given_by_the_caller() -> None:
    with pytest.raises(PolicyError) as e:
        load_policy_texts({"a/x.yaml": DESTS, "a/b/y.yaml": ""}, root="policies")
    assert e.value.problems == ["policies: no Mesh document found; exactly one is required"]


def test_reports_every_problem_at_once() -> None:
    text = D + "  hots: a.example\n  port: 0\n  tls: tcp\n"
    assert problems(base(a=text)) == [
        'p/a.yaml:4:1: missing required field "host" in Destination spec',
        'p/a.yaml:5:3: unknown field "hots" in Destination spec (did you mean "host"?)',
        "p/a.yaml:6:9: port 0: must be between 1 and 65535",
        'p/a.yaml:7:8: tls "tcp": must be one of originate, passthrough, none',
    ]


def test_three_errors_in_one_file_give_three_lines() -> None:
    rules = R + "      methods: [get]\n" + R + "      paths: [x]\n" + R + "      tools: [a b]\n"
    assert problems(base(agents=agent("researcher", rules))) == [
        'p/agents.yaml:8:17: methods[0] "get": HTTP methods must be upper-case (did you mean "GET"?)',
        'p/agents.yaml:10:15: paths[0] "x": must start with "/"',
        "p/agents.yaml:12:15: tools[0] \"a b\": must be 1-128 letters, digits, '_', '.' or '-'",
    ]


def test_problems_across_files_are_sorted_by_file_line_col() -> None:
    got = problems(base(b=D + "  host: a.example\n  port: 0\n", a=HEAD + "kind: Nope\n"))
    assert got == [
        'p/a.yaml:2:1: unknown kind "Nope" (expected one of AgentGroup, AgentPolicy, DefaultPolicy, Destination, Mesh)',
        "p/b.yaml:6:9: port 0: must be between 1 and 65535",
    ]


def test_syntax_error_suppresses_cross_document_checks() -> None:
    """A broken file may hide the Mesh or a destination; don't pile false errors on top."""
    files = {"p/a.yaml": "kind: [", "p/agents.yaml": agent("researcher", "    - destination: gh\n")}
    got = problems(files)
    assert len(got) == 1 and got[0].startswith("p/a.yaml:1:8: YAML syntax error")


def test_credentials_format_value_is_never_echoed() -> None:
    text = (
        D
        + '  host: a.example\n  port: 443\n  credentials: {header: A, secret: k, format: "sk-live-1234"}\n'
    )
    got = problems(base(a=text))
    assert got == ["p/a.yaml:7:47: credentials.format: must contain {secret} exactly once"]
    assert "sk-live" not in "\n".join(got)


def test_bytes_that_are_not_utf8_are_a_problem_not_a_crash() -> None:
    files: dict[str, object] = {"p/mesh.yaml": MESH, "p/bad.yaml": b"\xff\xfe kind"}
    with pytest.raises(PolicyError) as e:
        load_policy_texts(files)  # type: ignore[arg-type]
    assert e.value.problems == ["p/bad.yaml: not valid UTF-8 text"]

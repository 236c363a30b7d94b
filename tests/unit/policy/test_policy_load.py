# ruff: noqa: E501  (inline YAML fixtures read best unwrapped)
"""Valid policies compile to the expected model, deterministically."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from policy_texts import DESTS, HEAD, MESH, R, agent, base

from meshgate.errors import PolicyError
from meshgate.policy.loader import (
    content_version,
    load_policy_dir,
    load_policy_dir_with_locations,
    load_policy_texts,
    read_policy_files,
)
from meshgate.policy.model import (
    Credentials,
    Destination,
    EgressRule,
    HeaderMatch,
    RateLimit,
    SecretsConfig,
)

REPO = Path(__file__).resolve().parents[3]

FULL_DEST = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: docs, labels: {team: search, a: b}}
spec:
  host: Docs.Tools.Example
  port: 443
  address: 10.0.0.7:8443
  caFile: ./ca/internal.pem
  identity: jwt
  credentials:
    header: Authorization
    secret: docs-key
    format: "Bearer {secret}"
"""

GROUPS = (
    HEAD
    + "kind: AgentGroup\nmetadata: {name: zeta}\nspec:\n  agents: [researcher]\n  egress:\n"
    + "    - destination: raw\n"
    + "---\n"
    + HEAD
    + "kind: AgentGroup\nmetadata: {name: alpha}\nspec:\n  agents: [researcher, coder]\n"
    + "  egress:\n    - destination: docs\n      methods: [GET]\n"
    + "---\n"
    + HEAD
    + "kind: DefaultPolicy\nmetadata: {name: everyone}\nspec:\n  egress:\n"
    + "    - destination: search-api\n      paths: [/health]\n"
)


def test_example_policies_dir_loads() -> None:
    model = load_policy_dir(REPO / "policies")
    assert model.mesh.trust_domain == "agents.local"
    assert model.mesh.gateway_listen_port == 15001
    assert model.mesh.secrets == SecretsConfig(provider="file", path="./secrets")
    assert [d.name for d in model.destinations] == ["code-mcp", "openai", "search"]
    assert [a.agent for a in model.agents] == ["coder", "researcher"]
    mcp = model.destination("code-mcp")
    assert (mcp.host, mcp.tls, mcp.address) == ("mcp.internal", "none", ("127.0.0.1", 8931))
    assert all(r.rate_limit for a in model.agents for r in a.rules)


def test_full_destination_compiles_every_field() -> None:
    model = load_policy_texts(base(d=FULL_DEST))
    assert model.destination("docs") == Destination(
        name="docs",
        host="docs.tools.example",  # host names are case-insensitive: stored lower-case
        port=443,
        tls="originate",
        address=("10.0.0.7", 8443),
        ca_file="./ca/internal.pem",
        credentials=Credentials("Authorization", "docs-key", "Bearer {secret}"),
        identity="jwt",
        labels=(("a", "b"), ("team", "search")),
    )


def test_defaults() -> None:
    model = load_policy_texts(base(d=FULL_DEST.split("  address")[0]))
    d = model.destination("docs")
    assert (d.tls, d.identity, d.address, d.credentials, d.ca_file) == (
        "originate",
        "none",
        None,
        None,
        None,
    )
    assert model.mesh.gateway_listen_port == 15001
    assert model.mesh.secrets == SecretsConfig()


def test_rule_fields_and_rate_limit_seconds() -> None:
    rules = (
        R
        + "      methods: [GET, POST]\n      paths: [/v1/search, /v1/docs/*]\n"
        + "      headers: [{name: X-Team, value: research}, {name: x-trace}]\n"
        + "      tools: [web_search]\n      rateLimit: {requests: 60, per: 2h}\n"
    )
    model = load_policy_texts(base(agents=agent("researcher", rules)))
    a = model.agent("researcher")
    assert a is not None and a.name == "researcher"
    assert a.rules == (
        EgressRule(
            destination="search-api",
            methods=("GET", "POST"),
            paths=("/v1/search", "/v1/docs/*"),
            headers=(HeaderMatch("x-team", "research"), HeaderMatch("x-trace", None)),
            tools=("web_search",),
            rate_limit=RateLimit(60, 7200),
        ),
    )


@pytest.mark.parametrize(
    ("per", "seconds"), [("1s", 1), ("10s", 10), ("1m", 60), ("1h", 3600), ("1d", 86400)]
)
def test_period_units(per: str, seconds: int) -> None:
    rules = R + f"      rateLimit: {{requests: 1, per: {per}}}\n"
    model = load_policy_texts(base(agents=agent("researcher", rules)))
    a = model.agent("researcher")
    assert a is not None and a.rules[0].rate_limit == RateLimit(1, seconds)


def test_groups_then_default_rules_follow_own_rules_in_group_name_order() -> None:
    files = base(
        d=FULL_DEST,
        agents=agent("researcher", R + "      methods: [POST]\n") + "---\n" + agent("coder", ""),
        groups=GROUPS,
    )
    model = load_policy_texts(files)
    researcher, coder = model.agent("researcher"), model.agent("coder")
    assert researcher is not None and coder is not None
    assert [r.destination for r in researcher.rules] == ["search-api", "docs", "raw", "search-api"]
    assert [r.destination for r in coder.rules] == ["docs", "search-api"]
    assert [a.agent for a in model.agents] == ["coder", "researcher"]


def test_vault_and_env_secret_providers() -> None:
    vault = (
        MESH
        + "  secrets:\n    provider: vault\n    mount: kv\n    address: https://v:8200\n    tls: true\n"
    )
    m = load_policy_texts(base(mesh=vault)).mesh.secrets
    assert m == SecretsConfig(
        "vault", None, (("address", "https://v:8200"), ("mount", "kv"), ("tls", "true"))
    )
    env = load_policy_texts(base(mesh=MESH + "  secrets: {provider: env}\n")).mesh.secrets
    assert env == SecretsConfig("env")


def test_ipv6_address_and_wildcard_host() -> None:
    text = (
        HEAD
        + "kind: Destination\nmetadata: {name: w}\nspec:\n  host: '*.example.com'\n  port: 443\n  address: '[::1]:8443'\n"
    )
    d = load_policy_texts(base(w=text)).destination("w")
    assert (d.host, d.address) == ("*.example.com", ("::1", 8443))


def test_anchors_and_merge_keys_work() -> None:
    rules = "    - &r {destination: search-api, methods: [GET], rateLimit: {requests: 1, per: 1s}}\n    - {<<: *r, methods: [POST]}\n"
    a = load_policy_texts(base(agents=agent("researcher", rules))).agent("researcher")
    assert a is not None and [r.methods for r in a.rules] == [("GET",), ("POST",)]


def test_empty_documents_and_comment_only_files_are_ignored() -> None:
    files = base(empty="# nothing here\n", blank="", trailing="---\n---\n")
    assert load_policy_texts(files).destinations


def test_version_is_content_hash_unless_given() -> None:
    files = base()
    model = load_policy_texts(files)
    # names relative to the policy's root, so its path's spelling does not matter
    relative = {name.removeprefix("p/"): text for name, text in files.items()}
    assert model.version == content_version(relative) and len(model.version) == 12
    for root in ("./p", "/abs/policies", "policies"):
        respelled = {f"{root}/{name}": text for name, text in relative.items()}
        assert load_policy_texts(respelled).version == model.version, root
    assert load_policy_texts(files, version="abc").version == "abc"
    changed = dict(files, **{"p/mesh.yaml": MESH + "# comment\n"})
    assert load_policy_texts(changed).version != model.version


def test_same_input_gives_equal_model_and_file_order_does_not_matter() -> None:
    files = base(
        d=FULL_DEST,
        agents=agent("researcher", R + "      methods: [PUT]\n") + "---\n" + agent("coder", ""),
        groups=GROUPS,
    )
    first = load_policy_texts(files)
    items = list(files.items())
    for seed in range(5):
        random.Random(seed).shuffle(items)
        assert load_policy_texts(dict(items)) == first


def test_load_policy_dir_reads_recursively_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "mesh.yaml").write_text(MESH)
    (tmp_path / "sub" / "deeper" / "dest.yml").write_text(DESTS)
    (tmp_path / ".git" / "broken.yaml").write_text("kind: [")
    (tmp_path / ".meshgate-lint.yaml").write_text("disable: [MG005]\n")
    (tmp_path / "notes.txt").write_text("kind: [")
    files = read_policy_files(tmp_path)
    assert list(files) == [str(tmp_path / "mesh.yaml"), str(tmp_path / "sub/deeper/dest.yml")]
    assert [d.name for d in load_policy_dir(tmp_path).destinations] == ["raw", "search-api"]


def test_messages_use_paths_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "mesh.yaml").write_text(MESH.replace("agents.example", "Bad"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as e:
        load_policy_dir(Path("policies"))
    assert e.value.problems == [
        'policies/mesh.yaml:5:16: trustDomain "Bad": must be a lower-case DNS name like agents.example'
    ]


def test_dir_without_yaml_and_missing_dir(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(PolicyError) as e:
        load_policy_dir(tmp_path)
    assert e.value.problems == [f"{tmp_path}: no *.yaml or *.yml policy files found"]
    with pytest.raises(PolicyError) as e:
        load_policy_dir(tmp_path / "nope")
    assert e.value.problems == [f"{tmp_path / 'nope'}: not a readable directory"]


def test_non_utf8_file_in_dir(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError) as e:
        read_policy_files(tmp_path)
    assert e.value.problems == [f"{tmp_path / 'mesh.yaml'}: not valid UTF-8 text"]


def test_unreadable_file(tmp_path: Path) -> None:
    # a dangling symlink is unreadable for root too (file modes are not, and CI runs as root)
    f = tmp_path / "mesh.yaml"
    f.symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(PolicyError) as e:
        read_policy_files(tmp_path)
    assert e.value.problems == [f"{f}: cannot read: No such file or directory"]


def test_source_map_locations() -> None:
    loaded = load_policy_dir_with_locations(REPO / "policies")
    src = loaded.sources
    assert src.destinations["code-mcp"].endswith("policies/destinations.yaml:29")
    assert src.agents["coder"].endswith("policies/agents.yaml:18")
    assert src.rules[("researcher", 1)].endswith("policies/agents.yaml:13")

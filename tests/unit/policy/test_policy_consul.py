# ruff: noqa: E501  (exact user-facing messages are long; wrapping them would hide typos)
"""Consul in policy: the Mesh's `consul` block, a Destination's `consul` service, their errors
at file:line, and what plan, lint and the JSON round trip make of them."""

from __future__ import annotations

from pathlib import PurePath

import pytest
from policy_texts import HEAD, MESH, agent, problems

from meshgate.policy.lint import LintConfig, lint_policy
from meshgate.policy.loader import load_policy_texts
from meshgate.policy.model import ConsulConfig, ConsulService
from meshgate.policy.paths import resolve_relative_paths
from meshgate.policy.plan import diff_policies, render_plan_text
from meshgate.policy.serialize import model_from_json, model_to_json

CONSUL_MESH = (
    MESH
    + "  consul:\n    address: http://127.0.0.1:8500\n    tokenSecret: consul-token\n    datacenter: dc1\n"
)


def dest(body: str, name: str = "inventory") -> str:
    return (
        f"{HEAD}kind: Destination\nmetadata: {{name: {name}}}\nspec:\n"
        f"  host: {name}.internal\n  port: 80\n  tls: none\n{body}"
    )


CONSUL_DEST = dest("  consul: {service: inventory-api, tag: v2, passingOnly: true}\n")


def files(mesh: str = CONSUL_MESH, d: str = CONSUL_DEST) -> dict[str, str]:
    return {
        "p/mesh.yaml": mesh,
        "p/dest.yaml": d,
        "p/agents.yaml": agent("researcher", "    - destination: inventory\n"),
    }


def test_consul_blocks_compile_into_the_model() -> None:
    model = load_policy_texts(files())
    assert model.mesh.consul == ConsulConfig("http://127.0.0.1:8500", "consul-token", "dc1")
    d = model.destination("inventory")
    assert d.consul == ConsulService("inventory-api", "v2", True)
    assert d.address is None


def test_defaults_https_with_ca_file_resolved_against_the_policy_root() -> None:
    mesh = MESH + "  consul: {address: 'https://consul.internal:8501/', caFile: ca/consul.pem}\n"
    model = load_policy_texts(files(mesh, dest("  consul: {service: inv}\n")))
    assert model.mesh.consul == ConsulConfig(
        "https://consul.internal:8501", ca_file="ca/consul.pem"
    )
    assert model.destination("inventory").consul == ConsulService("inv")  # passingOnly: true
    resolved = resolve_relative_paths(model, PurePath("/srv/policy"))
    assert resolved.mesh.consul is not None
    assert resolved.mesh.consul.ca_file == "/srv/policy/ca/consul.pem"


BAD = [
    pytest.param(
        files(d=dest("  address: 127.0.0.1:9000\n  consul: {service: inv}\n")),
        [
            "p/dest.yaml:9:3: a destination has either address or consul, not both (consul finds the instances the address would name)"
        ],
        id="address-and-consul",
    ),
    pytest.param(
        files(mesh=MESH),
        ["p/dest.yaml:8:3: consul needs a consul block in the Mesh spec (consul: {address: ...})"],
        id="no-mesh-consul",
    ),
    pytest.param(
        files(d=dest("  consul: {service: inv, passingonly: false}\n")),
        ['p/dest.yaml:8:26: unknown field "passingonly" in consul (did you mean "passingOnly"?)'],
        id="unknown-key-destination",
    ),
    pytest.param(
        files(mesh=MESH + "  consul: {address: http://c:8500, token: abc}\n"),
        ['p/mesh.yaml:6:36: unknown field "token" in consul (did you mean "tokenSecret"?)'],
        id="unknown-key-mesh",
    ),
    pytest.param(
        files(mesh=MESH + "  consul: {address: 'consul:8500'}\n"),
        [
            'p/mesh.yaml:6:21: consul.address "consul:8500": must start with http:// or https://, like http://127.0.0.1:8500'
        ],
        id="no-scheme",
    ),
    pytest.param(
        files(mesh=MESH + "  consul: {address: 'ftp://consul:8500'}\n"),
        [
            'p/mesh.yaml:6:21: consul.address "ftp://consul:8500": must start with http:// or https://, like http://127.0.0.1:8500'
        ],
        id="bad-scheme",
    ),
    pytest.param(
        files(mesh=MESH + "  consul: {address: 'http://consul:8500/v1'}\n"),
        [
            'p/mesh.yaml:6:21: consul.address "http://consul:8500/v1": must be http(s)://host:port with no path, query or user'
        ],
        id="path",
    ),
    pytest.param(
        files(mesh=MESH + "  consul: {address: 'http://consul:8500', caFile: ca.pem}\n"),
        ["p/mesh.yaml:6:43: consul.caFile needs an https:// address"],
        id="ca-file-without-https",
    ),
    pytest.param(
        files(d=dest("  consul: {service: 'bad name'}\n")),
        [
            "p/dest.yaml:8:21: consul.service \"bad name\": must be letters, digits, '-', '_' or '.', starting and ending with a letter or digit, at most 128 characters"
        ],
        id="bad-service-name",
    ),
    pytest.param(
        files(d=dest("  consul: {tag: v1}\n")),
        ['p/dest.yaml:8:3: missing required field "service" in consul'],
        id="missing-service",
    ),
    pytest.param(
        files(d=dest("  consul: {service: inv, passingOnly: 'yes'}\n")),
        ["p/dest.yaml:8:39: consul.passingOnly: expected true or false, got a string"],
        id="passing-only-type",
    ),
]


@pytest.mark.parametrize(("texts", "expected"), BAD)
def test_bad_consul_policy_is_reported_at_file_line(
    texts: dict[str, str], expected: list[str]
) -> None:
    assert problems(texts) == expected


def test_plan_shows_the_consul_service_change_and_json_round_trips() -> None:
    old = load_policy_texts(files())
    new = load_policy_texts(
        files(d=dest("  consul: {service: inventory-v3, passingOnly: false}\n"))
    )
    text = render_plan_text(diff_policies(old, new))
    assert "~ destination inventory" in text
    assert "consul.service: inventory-api -> inventory-v3" in text
    assert "consul.tag: v2 -> (unset)" in text
    assert "consul.passingOnly: true -> false" in text
    assert model_from_json(model_to_json(new)) == new
    assert model_from_json(model_to_json(old)) == old
    added = render_plan_text(diff_policies(None, old))
    assert "+ consul.address: http://127.0.0.1:8500" in added
    assert "+ consul.tokenSecret: consul-token" in added


def test_lint_treats_a_consul_service_as_a_private_target() -> None:
    public = CONSUL_DEST.replace("inventory.internal", "inventory.example.com")
    model = load_policy_texts(files(d=public))
    ids = {f.id for f in lint_policy(model, LintConfig())}
    assert "MG004" not in ids  # tls: none to an instance of the internal catalogue is fine
    plain = load_policy_texts(
        files(mesh=MESH, d=dest("").replace("inventory.internal", "inventory.example.com"))
    )
    assert "MG004" in {f.id for f in lint_policy(plain, LintConfig())}

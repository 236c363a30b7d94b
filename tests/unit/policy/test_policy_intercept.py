"""`intercept` on a Destination: default on for tls: originate, opt-out kept, elsewhere an error
with its position; `meshgate plan` shows it."""

from __future__ import annotations

from policy_texts import HEAD, MESH, problems

from meshgate.policy.loader import load_policy_texts
from meshgate.policy.plan import _destination_fields

D = HEAD + "kind: Destination\nmetadata: {name: a}\nspec:\n"


def load(spec: str) -> dict[str, object]:
    model = load_policy_texts({"p/mesh.yaml": MESH, "p/a.yaml": D + spec})
    (dest,) = model.destinations
    return {"intercept": dest.intercept, "fields": _destination_fields(dest)}


def test_originate_is_intercepted_unless_it_opts_out() -> None:
    default = load("  host: a.example\n  port: 443\n")
    assert default["intercept"] is True
    assert default["fields"]["intercept"] == "true"  # type: ignore[index]
    opted_out = load("  host: a.example\n  port: 443\n  intercept: false\n")
    assert opted_out["intercept"] is False
    assert opted_out["fields"]["intercept"] == "false"  # type: ignore[index]
    assert load("  host: a.example\n  port: 443\n  intercept: true\n")["intercept"] is True


def test_plan_says_nothing_of_intercept_where_it_does_not_apply() -> None:
    plain = load("  host: a.internal\n  port: 80\n  tls: none\n")
    assert "intercept" not in plain["fields"]  # type: ignore[operator]


def test_intercept_outside_originate_is_an_error_at_its_key() -> None:
    for tls in ("none", "passthrough"):
        spec = f"  host: a.internal\n  port: 80\n  tls: {tls}\n  intercept: false\n"
        assert problems({"p/mesh.yaml": MESH, "p/a.yaml": D + spec}) == [
            f"p/a.yaml:8:3: intercept is only valid with tls: originate (this destination uses "
            f"tls: {tls}, whose CONNECT the sidecar never opens)"
        ]


def test_intercept_must_be_a_boolean() -> None:
    spec = "  host: a.example\n  port: 443\n  intercept: sometimes\n"
    (problem,) = problems({"p/mesh.yaml": MESH, "p/a.yaml": D + spec})
    assert problem.startswith("p/a.yaml:7:14: ")

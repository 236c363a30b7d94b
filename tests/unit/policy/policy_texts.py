"""Small policy texts shared by the policy tests."""

from __future__ import annotations

from meshgate.errors import PolicyError
from meshgate.policy.loader import load_policy_texts

MESH = """\
apiVersion: meshgate.dev/v1
kind: Mesh
metadata: {name: default}
spec:
  trustDomain: agents.example
"""

DESTS = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: search-api}
spec:
  host: search.tools.example
  port: 443
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: raw}
spec:
  host: raw.example
  port: 443
  tls: passthrough
"""

HEAD = "apiVersion: meshgate.dev/v1\n"


def agent(name: str, rules: str) -> str:
    """An AgentPolicy; `rules` is the YAML of the egress list, indented by 4."""
    return f"{HEAD}kind: AgentPolicy\nmetadata: {{name: {name}}}\nspec:\n  agent: {name}\n" + (
        f"  egress:\n{rules}" if rules else ""
    )


def base(**extra: str) -> dict[str, str]:
    """Mesh and destinations in p/, plus extra files given as name=text (name without .yaml)."""
    files = {"p/mesh.yaml": MESH, "p/dest.yaml": DESTS}
    files.update({f"p/{k}.yaml": v for k, v in extra.items()})
    return files


def problems(files: dict[str, str]) -> list[str]:
    try:
        load_policy_texts(files)
    except PolicyError as e:
        return e.problems
    raise AssertionError("expected a PolicyError")


R = "    - destination: search-api\n"

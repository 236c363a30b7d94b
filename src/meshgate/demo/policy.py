"""The demo's policy directory: the stand-ins as destinations under their real host names, two
agents, and a provider key only the gateway holds. Written at each start, since the stand-ins'
ports are the OS's choice; a reader finds it in STATE_DIR/demo/policies."""

from __future__ import annotations

import secrets
from pathlib import Path

from meshgate.identity.ca import write_files

LLM_HOST = "api.openai.com"  # the openai SDK's default base URL works unchanged
MCP_HOST = "mcp.demo.example"
KEY_SECRET = "openai-api-key"
MODELS_PER_MINUTE = 2  # small, so the demo agent meets the limit on its third call

MESH = """\
# The demo mesh, written by `meshgate demo` at each start (edits apply until it restarts).
apiVersion: meshgate.dev/v1
kind: Mesh
metadata: {{name: demo}}
spec:
  trustDomain: agents.local
  egressGateway: {{listenPort: {gateway_port}}}
  secrets: {{provider: file, path: ./secrets}}   # ./secrets/openai-api-key: the gateway's only
"""

DESTINATIONS = """\
# The stand-ins, under the names agents use. `address` sends the gateway to loopback, and the
# gateway verifies them against the demo's own CA (caFile), as it would a real provider.
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: openai, labels: {{category: llm}}}}
spec:
  host: {llm_host}
  port: 443
  tls: originate
  address: 127.0.0.1:{llm_port}
  caFile: ./ca/upstream-ca.pem
  credentials: {{header: Authorization, secret: {key_secret}, format: "Bearer {{secret}}"}}
  llm: {{api: openai}}               # the audit records model and tokens, streamed or not
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: docs-mcp, labels: {{category: mcp}}}}
spec:
  host: {mcp_host}
  port: 443
  tls: originate
  address: 127.0.0.1:{mcp_port}
  caFile: ./ca/upstream-ca.pem
"""

AGENTS = """\
# researcher: chat completions, and the model list twice a minute; nothing else on openai.
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: researcher}}
spec:
  agent: researcher
  egress:
    - destination: openai
      methods: [POST]
      paths: ["/v1/chat/completions"]
      rateLimit: {{requests: 30, per: 1m}}
    - destination: openai
      methods: [GET]
      paths: ["/v1/models"]
      rateLimit: {{requests: {models_per_minute}, per: 1m}}
---
# coder: two tools of the docs MCP server; open_issue only in the demo/ organisation.
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: coder}}
spec:
  agent: coder
  egress:
    - destination: docs-mcp
      paths: ["/mcp"]
      tools:
        - search_docs
        - name: open_issue
          arguments:
            repo: {{pattern: "^demo/[a-z0-9._-]+$"}}
            title: {{maxLength: 80}}
      rateLimit: {{requests: 120, per: 1m}}
"""


def new_provider_key() -> str:
    """A fresh key per start: only the provider stand-in and the gateway's secret file hold it."""
    return f"sk-demo-{secrets.token_hex(16)}"


def policy_dir(state_dir: Path) -> Path:
    return state_dir / "demo" / "policies"


def write_policy(
    state_dir: Path, gateway_port: int, llm_port: int, mcp_port: int, key: str
) -> Path:
    """Write the policy for stand-ins on these ports, and the provider key (0600); its path.
    The stand-ins' CA is already in its ca/ (start_standins)."""
    directory = policy_dir(state_dir)
    for sub in (directory, directory / "secrets", directory / "ca"):
        sub.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_files(directory / "secrets", [(KEY_SECRET, key.encode(), 0o600)])
    texts = {
        "mesh.yaml": MESH.format(gateway_port=gateway_port),
        "destinations.yaml": DESTINATIONS.format(
            llm_host=LLM_HOST,
            llm_port=llm_port,
            mcp_host=MCP_HOST,
            mcp_port=mcp_port,
            key_secret=KEY_SECRET,
        ),
        "agents.yaml": AGENTS.format(models_per_minute=MODELS_PER_MINUTE),
    }
    write_files(directory, [(name, text.encode(), 0o600) for name, text in texts.items()])
    return directory

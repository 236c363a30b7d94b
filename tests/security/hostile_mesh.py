"""A whole mesh started the way users start it, attacked from agents (fixture: conftest.py).

`mesh` runs once per mode for the session:
- "up":    `meshgate up` (control plane + local gateway in one process tree);
- "split": `meshgate serve` + `meshgate gateway`, as the README's command table shows.
Both run with cwd `mesh.root`, which holds `policies/` and the state dir `.meshgate/`, so the CLI's
defaults are the ones under attack. Agents start with `meshgate sidecar run` exactly as an operator
would start them, with the secure defaults (CMD as an unprivileged user when run as root). Agent
scripts are stdlib-only and run with the system `/usr/bin/python3`: the dropped user cannot run
the test venv's interpreter (it lives under /root).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

MESHGATE = [sys.executable, "-m", "meshgate.cli"]
AGENT_PYTHON = "/usr/bin/python3"
BILLING_SECRET = "sk-billing-SECRET-7f3a"
UPSTREAMS = ("docs", "mcp", "quota", "billing", "vault", "secure")
TLS_UPSTREAM = "secure"  # served over TLS with a certificate for secure.test

# One policy for the session; `{NAME}` is an upstream's port, `{gateway_port}` the gateway's.
# Append what a test needs.
POLICY_FILES: dict[str, str] = {
    "mesh.yaml": """\
apiVersion: meshgate.dev/v1
kind: Mesh
metadata: {name: default}
spec:
  trustDomain: agents.test
  egressGateway: {listenPort: {gateway_port}}
  secrets: {provider: file, path: ./secrets}
""",
    "destinations.yaml": """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: docs}
spec: {host: docs.internal, port: 80, tls: none, address: "127.0.0.1:{docs}"}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: mcp}
spec: {host: mcp.internal, port: 80, tls: none, address: "127.0.0.1:{mcp}"}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: quota}
spec: {host: quota.internal, port: 80, tls: none, address: "127.0.0.1:{quota}"}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: billing}
spec:
  host: billing.internal
  port: 80
  tls: none
  address: "127.0.0.1:{billing}"
  credentials: {header: X-Api-Key, secret: billing-key}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: vault}
spec: {host: vault.test, port: 443, tls: passthrough, address: "127.0.0.1:{vault}"}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: secure}
spec:
  host: secure.test
  port: 443
  tls: originate
  address: "127.0.0.1:{secure}"
  caFile: "{upstream_ca}"
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: wild-mcp}
spec:
  host: "*.wild.internal"
  port: 80
  tls: none
  address: "127.0.0.1:{mcp}"
""",
    "agents.yaml": """\
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: researcher}
spec:
  agent: researcher
  egress:
    - destination: docs
      methods: [GET]
      paths: ["/v1/docs/*", "/v1/search"]
    - destination: mcp
      methods: [POST]
      paths: ["/mcp"]
      tools: [read_file]
    - destination: quota
      methods: [GET]
      paths: ["/a", "/b"]
      rateLimit: {requests: 3, per: 1m}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: accountant}
spec:
  agent: accountant
  egress:
    - destination: billing
      methods: [GET]
      paths: ["/invoices*"]
""",
    # tests/security/test_gateway_*.py: agents of their own, so no other test drains their buckets
    "gateway-agents.yaml": """\
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: gw-mcp}
spec:
  agent: gw-mcp
  egress:
    - destination: mcp
      paths: ["/mcp"]
      tools: [read_file]
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: gw-rl}
spec:
  agent: gw-rl
  egress:
    - destination: quota
      methods: [GET]
      paths: ["/a", "/b"]
      rateLimit: {requests: 3, per: 1m}
    - destination: mcp
      paths: ["/mcp"]
      tools: [read_file]
      rateLimit: {requests: 3, per: 1m}
""",
    # tests/security/test_{intercept,limits,pacer}_hostile.py
    "sec-agents.yaml": """\
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: sec-tls}
spec:
  agent: sec-tls
  egress:
    - destination: secure
      methods: [GET]
      paths: ["/v1/*"]
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: sec-global}
spec:
  agent: sec-global
  egress:
    - destination: quota
      methods: [GET]
      paths: ["/a", "/b"]
      rateLimit: {requests: 3, per: 1m, scope: global, onStoreFailure: closed}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: sec-spender}
spec:
  agent: sec-spender
  budgets:
    - {name: daily, window: day, requests: 3}
  egress:
    - destination: docs
      methods: [GET, HEAD]
      paths: ["/v1/docs/*"]
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: sec-tunneler}
spec:
  agent: sec-tunneler
  budgets:
    - {name: daily, window: day, requests: 2}
  egress:
    - destination: vault
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: sec-mcp}
spec:
  agent: sec-mcp
  egress:
    - destination: mcp
      paths: ["/mcp"]
      tools:
        - name: read_file
          arguments:
            path: {prefix: "/workspace/"}
        - name: set_level
          arguments:
            level: {maximum: 3}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {name: sec-wild}
spec:
  agent: sec-wild
  egress:
    - destination: wild-mcp
      paths: ["/mcp"]
      tools: [read_file]
""",
}


@dataclass
class Echo:
    """A loopback HTTP server that records each request exactly as it arrived."""

    name: str
    server: ThreadingHTTPServer
    hits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def clear(self) -> None:
        self.hits.clear()


def start_echo(name: str, tls: ssl.SSLContext | None = None) -> Echo:
    """`tls`: serve HTTPS with this context (each connection's handshake in its own thread)."""
    echo: Echo

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length).decode(errors="replace") if length else ""
            echo.hits.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
            )
            out = json.dumps({"upstream": name, "method": self.command, "path": self.path})
            data = out.encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def finish_request(self, request: Any, client_address: Any) -> None:
            if tls is not None:
                try:
                    request = tls.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):
                    return
            super().finish_request(request, client_address)

    server = Server(("127.0.0.1", 0), Handler)
    echo = Echo(name, server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return echo


@dataclass
class Mesh:
    mode: str
    root: Path
    xds: str
    admin_url: str
    gateway_port: int
    upstreams: dict[str, Echo]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.root / ".meshgate"

    @property
    def policy_dir(self) -> Path:
        return self.root / "policies"

    def meshgate(
        self, *args: str, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*MESHGATE, *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "COLUMNS": "200", **(env or {})},
            stdin=subprocess.DEVNULL,
        )

    def agent(
        self,
        agent: str,
        argv: list[str],
        *,
        sidecar_args: tuple[str, ...] = (),
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`meshgate sidecar run --agent AGENT -- ARGV`, as an operator starts an agent;
        `env`: added to the launcher's environment."""
        return self.meshgate(
            "sidecar",
            "run",
            "--agent",
            agent,
            "--control-plane",
            self.xds,
            *sidecar_args,
            "--",
            *argv,
            timeout=timeout,
            env=env,
        )

    def agent_python(
        self,
        agent: str,
        code: str,
        *,
        sidecar_args: tuple[str, ...] = (),
        timeout: float = 60,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Any:
        """Run a stdlib-only script (with ARGS) as AGENT; its last stdout line is JSON."""
        scripts = self.root / "scripts"
        fd, name = tempfile.mkstemp(suffix=".py", dir=scripts)
        with os.fdopen(fd, "w") as fh:
            fh.write(code)
        os.chmod(name, 0o644)
        done = self.agent(
            agent, [AGENT_PYTHON, name, *args], sidecar_args=sidecar_args, timeout=timeout, env=env
        )
        assert done.returncode == 0, (
            f"agent exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        lines = done.stdout.strip().splitlines()
        assert lines, f"agent printed nothing:\n{done.stderr}"
        return json.loads(lines[-1])

    def audit(self, *filters: str, min_count: int = 1, timeout: float = 20) -> list[dict[str, Any]]:
        """`meshgate audit query --format json FILTERS`, polled until MIN_COUNT records."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.meshgate("audit", "query", "--format", "json", *filters)
            assert done.returncode == 0, done.stderr
            records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
            if len(records) >= min_count or time.monotonic() > deadline:
                return records
            time.sleep(0.3)

    def audit_record(self, request_id: str, timeout: float = 20) -> dict[str, Any] | None:
        """The record of one request, once shipped (None if it never arrives)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                r
                for r in self.audit("--since", "10m", "--limit", "5000", min_count=0, timeout=0)
                if r["request_id"] == request_id
            ]
            if found or time.monotonic() > deadline:
                return found[0] if found else None
            time.sleep(0.3)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)


def _wait(predicate: Any, what: str, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: {p.args!r} exited {p.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.2)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _write_tree(
    root: Path, upstreams: dict[str, Echo], gateway_port: int, upstream_ca: Path
) -> None:
    os.chmod(root, 0o755)  # the dropped agent user needs to reach its scripts, nothing else
    (root / "scripts").mkdir(mode=0o755)
    os.chmod(root / "scripts", 0o755)
    policies = root / "policies"
    policies.mkdir()
    ports: dict[str, object] = {name: echo.port for name, echo in upstreams.items()}
    for name, text in POLICY_FILES.items():
        for key, value in {
            "gateway_port": gateway_port,
            "upstream_ca": upstream_ca,
            **ports,
        }.items():
            text = text.replace("{" + key + "}", str(value))
        (policies / name).write_text(text)
    secrets = policies / "secrets"
    secrets.mkdir(mode=0o700)
    key = secrets / "billing-key"
    key.write_text(BILLING_SECRET)
    os.chmod(key, 0o600)


def _start(
    mode: str, root: Path, xds: int, admin: int, logs: Path
) -> list[subprocess.Popen[bytes]]:
    def spawn(*args: str, log: str) -> subprocess.Popen[bytes]:
        out = open(logs / log, "wb")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [*MESHGATE, *args], cwd=root, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    common = ("--xds-port", str(xds), "--admin-port", str(admin))
    if mode == "up":
        return [spawn("up", *common, log="up.log")]
    serve = spawn("serve", *common, log="serve.log")
    _wait(lambda: _http_ok(f"http://127.0.0.1:{admin}/readyz"), "serve ready", [serve], 60)
    gateway = spawn("gateway", "--control-plane", f"127.0.0.1:{xds}", log="gateway.log")
    return [serve, gateway]

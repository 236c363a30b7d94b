"""Issue 21: `https://` to a `tls: originate` destination through the sidecar, as SDKs send it.

The sidecar opens the agent's CONNECT, terminates its TLS with an agent-trust certificate and
hands the request to the gateway like plain HTTP (methods, paths, credentials, pacer, audit);
every CONNECT it does not open is refused with a status and a JSON body that say why, and an
audit record. Real Envoy, real SDKs (openai, anthropic), httpx, curl and Node.js, against the
demo LLM provider serving TLS for the providers' real host names (reached at 127.0.0.1 only).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from builders import free_port, write_test_pki
from harness import MESH, audit_records, control_plane, gateway, sidecar, until, upstream

from meshgate.controlplane.server import ControlPlane
from meshgate.demo.llm_provider import LlmProvider
from meshgate.identity.agent_trust import AGENT_TRUST_DIR, CA_KEY, ca_cert_path

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-mesh-OPENAI-0123456789"
ANTHROPIC_KEY = "sk-mesh-ANTHROPIC-0123456789"

POLICY = """\
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: openai}}
spec:
  host: api.openai.com
  port: 443
  address: 127.0.0.1:{llm}
  caFile: {ca}
  credentials: {{header: Authorization, secret: openai-key, format: "Bearer {{secret}}"}}
  llm: {{api: openai}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: anthropic}}
spec:
  host: api.anthropic.com
  port: 443
  address: 127.0.0.1:{llm}
  caFile: {ca}
  # the SDK sends its key as Authorization: Bearer (this version): the gateway replaces it
  credentials: {{header: Authorization, secret: anthropic-key, format: "Bearer {{secret}}"}}
  llm: {{api: anthropic}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: pinned}}
spec:
  host: pinned.test
  port: 443
  tls: originate
  intercept: false
  address: 127.0.0.1:{echo}
  caFile: {ca}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: keyless}}
spec:
  host: keyless.test
  port: 443
  intercept: false
  address: 127.0.0.1:{echo}
  caFile: {ca}
  credentials: {{header: X-Api-Key, secret: not-there}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: vault}}
spec:
  host: vault.test
  port: 443
  tls: passthrough
  address: 127.0.0.1:{echo}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: researcher}}
spec:
  agent: researcher
  egress:
    - destination: openai
      methods: [POST]
      paths: ["/v1/chat/completions"]
    - destination: anthropic
      methods: [POST]
      paths: ["/v1/messages"]
    - destination: pinned
    - destination: keyless
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: coder}}
spec:
  agent: coder
  egress:
    - destination: pinned
"""

HOSTS = ["api.openai.com", "api.anthropic.com", "pinned.test", "keyless.test", "vault.test"]


@dataclass
class Mesh:
    cp: ControlPlane
    state: Path
    provider: LlmProvider
    echo_hits: list[dict[str, Any]]
    upstream_ca: Path
    tmp: Path


@asynccontextmanager
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    """A control plane with mTLS (interception needs the agents' certificates), a gateway
    shipping its audit, the LLM provider and an echo server behind TLS for every host."""
    ca, cert, key = write_test_pki(tmp_path / "pki", HOSTS, "upstream")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    provider = LlmProvider(reply_tokens=4, token_delay=0.01)
    llm_port = await provider.start(tls=server)
    listen = free_port()
    try:
        async with upstream("echo", server) as echo:
            policy = tmp_path / "policies"
            (policy / "secrets").mkdir(parents=True)
            (policy / "mesh.yaml").write_text(
                MESH.format(port=listen) + "  secrets: {provider: file, path: ./secrets}\n"
            )
            (policy / "secrets" / "openai-key").write_text(OPENAI_KEY)
            (policy / "secrets" / "anthropic-key").write_text(ANTHROPIC_KEY)
            (policy / "rules.yaml").write_text(POLICY.format(llm=llm_port, echo=echo.port, ca=ca))
            state = tmp_path / "state"
            async with (
                control_plane(policy, state, mtls=True) as cp,
                gateway(cp, tmp_path, audit=True),
            ):
                yield Mesh(cp, state, provider, echo.hits, ca, tmp_path)
    finally:
        await provider.stop()


async def raw_connect(proxy: str, authority: str) -> tuple[str, dict[str, str], str]:
    """A bare CONNECT: (status line, headers, body), as an SDK's proxy error would see it."""
    host, port = proxy.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


def tls_through_tunnel(proxy: str, authority: str, sni: str, cafile: Path) -> str:
    """CONNECT, then a TLS handshake naming `sni`, verified against `cafile` only: the peer
    certificate's subject, or the error."""
    host, port = proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            return "refused: " + head.decode(errors="replace").split("\r\n")[0]
        ctx = ssl.create_default_context(cafile=str(cafile))
        try:
            with ctx.wrap_socket(sock, server_hostname=sni) as tls:
                peer = tls.getpeercert()
                return "ok: " + json.dumps(peer.get("subjectAltName"))
        except (ssl.SSLError, OSError) as exc:
            return f"tls failed: {exc}"


async def record_of(cp: ControlPlane, request_id: str) -> Any:
    return await until(
        lambda: next((r for r in audit_records(cp) if r.request_id == request_id), None),
        15,
        f"audit record {request_id}",
    )


AGENT = """\
import json, os, subprocess, sys
import anthropic, httpx, openai

out = {"env": {k: os.environ.get(k) for k in (
    "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO", "AWS_CA_BUNDLE")}}
say = [{"role": "user", "content": "hello there"}]
# the SDKs' defaults: https://api.openai.com/v1 and https://api.anthropic.com, via HTTPS_PROXY
oa = openai.OpenAI(api_key="sk-agent-own", max_retries=0)
r = oa.chat.completions.create(model="gpt-4o-mini", messages=say, max_tokens=3)
out["openai"] = r.choices[0].message.content
stream = oa.chat.completions.create(
    model="gpt-4o-mini", messages=say, max_tokens=3, stream=True,
    stream_options={"include_usage": True})
chunks = [c for c in stream]
out["openai_stream"] = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                        chunks[-1].usage.completion_tokens]
try:
    oa.models.list()
    out["models"] = "allowed"
except openai.APIStatusError as e:
    out["models"] = [e.status_code, e.response.json()]
an = anthropic.Anthropic(api_key="sk-agent-own", max_retries=0)
m = an.messages.create(model="claude-haiku", max_tokens=3, messages=say)
out["anthropic"] = m.content[0].text
with an.messages.stream(model="claude-haiku", max_tokens=3, messages=say) as s:
    out["anthropic_stream"] = "".join(s.text_stream)
with httpx.Client() as c:
    r = c.post("https://api.openai.com/v1/chat/completions",
               json={"model": "gpt-4o-mini", "messages": say, "max_tokens": 2})
    out["httpx"] = [r.status_code, r.json()["model"]]
done = subprocess.run(
    ["curl", "-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
     "-H", "content-type: application/json",
     "-d", json.dumps({"model": "gpt-4o-mini", "messages": say, "max_tokens": 2}),
     "https://api.openai.com/v1/chat/completions"], capture_output=True, text=True)
out["curl"] = [done.stdout, done.stderr]
print(json.dumps(out))
"""

# Node.js 20 has no proxy support of its own: CONNECT by hand, then TLS verified with the
# default store plus NODE_EXTRA_CA_CERTS (what every Node HTTPS client ends up doing).
NODE_AGENT = """\
const http = require("http"), tls = require("tls");
const proxy = new URL(process.env.HTTPS_PROXY);
const req = http.request({host: proxy.hostname, port: proxy.port, method: "CONNECT",
                          path: "api.openai.com:443"});
req.on("connect", (res, socket) => {
  const s = tls.connect({socket, servername: "api.openai.com"}, () => {
    s.write("GET /v1/chat/completions HTTP/1.1\\r\\nHost: api.openai.com\\r\\n" +
            "Connection: close\\r\\n\\r\\n");
  });
  let data = "";
  s.on("data", d => data += d);
  s.on("end", () => console.log(JSON.stringify({ok: true, status: data.split("\\r\\n")[0]})));
  s.on("error", e => console.log(JSON.stringify({ok: false, error: String(e)})));
});
req.end();
"""


async def sidecar_run(m: Mesh, agent: str, argv: list[str]) -> tuple[int, str, str]:
    """`meshgate sidecar run` as an operator starts an agent (same user here: the test venv's
    SDKs; the dropped-user case is the hostile test below)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshgate.cli", "sidecar", "run", "--agent", agent,
        "--control-plane", m.cp.xds_address, "--state-dir", str(m.tmp / f"sc-{agent}"),
        "--insecure",  # the harness's control plane serves plaintext xDS
        "--insecure-same-user",
        "--agent-trust-ca", str(ca_cert_path(m.state)),
        "--", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_official_sdks_with_default_https_urls_get_policy_credentials_and_audit(
    tmp_path: Path,
) -> None:
    async with mesh(tmp_path) as m:
        script = tmp_path / "agent.py"
        script.write_text(AGENT)
        code, out, err = await sidecar_run(m, "researcher", [sys.executable, str(script)])
        assert code == 0, err
        seen = json.loads(out.strip().splitlines()[-1])
        env = seen["env"]
        bundle = Path(env["SSL_CERT_FILE"])
        assert env["REQUESTS_CA_BUNDLE"] == env["CURL_CA_BUNDLE"] == str(bundle)
        assert env["GIT_SSL_CAINFO"] == env["AWS_CA_BUNDLE"] == str(bundle)
        assert Path(env["NODE_EXTRA_CA_CERTS"]).name == "agent-trust-ca.pem"
        assert not bundle.exists(), "the launcher removes the agent's trust files at exit"
        assert seen["openai"] == "ok ok ok"
        assert seen["openai_stream"] == ["ok ok ok", 3]  # SSE, with usage, through the tunnel
        assert seen["anthropic"] == "ok ok ok"
        assert seen["anthropic_stream"] == "ok ok ok"
        assert seen["httpx"] == [200, "gpt-4o-mini"]
        assert seen["curl"] == ["2 200", ""]  # HTTP/2 (ALPN h2) to the sidecar
        # the same rules as plain HTTP: GET /v1/models is no rule of the researcher's
        status, body = seen["models"]
        assert status == 403
        assert body["error"] == "egress_denied" and body["destination"] == "openai"
        # credentials injected by the gateway, never the agent's own
        assert m.provider.seen
        for req in m.provider.seen:
            headers = {k.lower(): v for k, v in req.headers.items()}
            assert "sk-agent-own" not in json.dumps(headers)
            assert "x-meshgate-agent" not in headers
            key = ANTHROPIC_KEY if req.path == "/v1/messages" else OPENAI_KEY
            assert headers["authorization"] == f"Bearer {key}"
        assert len(m.provider.seen) == 6  # 2 openai, 2 anthropic, httpx, curl; not /v1/models
        # audited by the gateway like plain HTTP, with what the pacer read from the SSE stream
        records = await until(
            lambda: (
                [r for r in audit_records(m.cp) if r.agent == "researcher"]
                if len(audit_records(m.cp)) >= 7
                else None
            ),
            15,
            "7 audit records",
        )
        allowed = [r for r in records if r.decision == "allowed"]
        assert {r.destination for r in allowed} == {"openai", "anthropic"}
        assert all(r.spiffe_id == "spiffe://agents.test/agent/researcher" for r in records)
        assert any(r.model == "gpt-4o-mini" and r.tokens_out == 3 for r in allowed)
        denied = [r for r in records if r.decision != "allowed"]
        assert [(r.method, r.path, r.status) for r in denied] == [("GET", "/v1/models", 403)]


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_node_trusts_the_sidecar_through_node_extra_ca_certs(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        script = tmp_path / "agent.js"
        script.write_text(NODE_AGENT)
        node = shutil.which("node")
        assert node is not None
        code, out, err = await sidecar_run(m, "researcher", [node, str(script)])
        assert code == 0, err
        seen = json.loads(out.strip().splitlines()[-1])
        # verified (else "self-signed certificate in chain"), then refused by the gateway's
        # rules: a GET is no rule of the researcher's on openai
        assert seen == {"ok": True, "status": "HTTP/1.1 403 Forbidden"}


async def test_agent_trust_is_for_destination_hosts_only_and_opt_out_keeps_connect(
    tmp_path: Path,
) -> None:
    async with mesh(tmp_path) as m, sidecar(m.cp, tmp_path, "researcher") as proxy:
        agent_ca = ca_cert_path(m.state)
        # an intercepted destination: its own name, signed by the agent-trust CA, nothing else
        served = await asyncio.to_thread(
            tls_through_tunnel, proxy, "api.openai.com:443", "api.openai.com", agent_ca
        )
        assert served == 'ok: [["DNS", "api.openai.com"]]'
        # the same tunnel, another name: no certificate is made up for it
        other = await asyncio.to_thread(
            tls_through_tunnel, proxy, "api.openai.com:443", "evil.example", agent_ca
        )
        assert other.startswith("tls failed"), other
        # a host that is no destination is never opened: the gateway refuses the CONNECT
        unknown = await asyncio.to_thread(
            tls_through_tunnel, proxy, "evil.example:443", "evil.example", agent_ca
        )
        assert unknown == "refused: HTTP/1.1 403 Forbidden"
        # nor is a destination that opted out (intercept: false): today's refusal, saying why
        pinned = await asyncio.to_thread(
            tls_through_tunnel, proxy, "pinned.test:443", "pinned.test", agent_ca
        )
        assert pinned == "refused: HTTP/1.1 403 Forbidden"
        status, _, body = await raw_connect(proxy, "pinned.test:443")
        assert status == "HTTP/1.1 403 Forbidden"
        assert json.loads(body) == {
            "error": "egress_denied",
            "agent": "spiffe://agents.test/agent/researcher",
            "destination": "pinned",
            "reason": "tls: originate: send plain HTTP through the proxy, not CONNECT "
            "(intercept: false)",
        }
        # a passthrough destination's tunnel carries the upstream's own certificate: the
        # agent-trust CA does not verify it, the upstream's CA does
        vault = await asyncio.to_thread(
            tls_through_tunnel, proxy, "vault.test:443", "vault.test", agent_ca
        )
        assert vault == "refused: HTTP/1.1 403 Forbidden"  # not granted to the researcher
        assert not m.echo_hits
        # the CA key stays the control plane's: 0600 in a 0700 directory
        directory = m.state / AGENT_TRUST_DIR
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE((directory / CA_KEY).stat().st_mode) == 0o600


async def test_every_refused_connect_says_why_and_is_audited(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m, sidecar(m.cp, tmp_path, "coder") as proxy:
        cases = {
            # authority: (status, error, reason fragment, audit route)
            "nowhere.example:443": (403, "unknown_destination", None, "unknown-destination"),
            "vault.test:443": (403, "egress_denied", "no rule of this agent allows a tunnel", None),
            "pinned.test:443": (403, "egress_denied", "send plain HTTP", None),
            # the bare 404: an opted-out destination whose secret is missing had no
            # CONNECT route at all
            "keyless.test:443": (403, "egress_denied", "send plain HTTP", None),
        }
        for authority, (code, error, reason, _) in cases.items():
            status, headers, body = await raw_connect(proxy, authority)
            assert status.startswith(f"HTTP/1.1 {code}"), (authority, status, body)
            assert headers["content-type"] == "application/json"
            refusal = json.loads(body)
            assert refusal["error"] == error, (authority, refusal)
            if reason is not None:
                assert reason in refusal["reason"]
            record = await record_of(m.cp, headers["x-request-id"])
            assert record.method == "CONNECT"
            assert record.host == authority
            assert record.status == code
            assert record.decision != "allowed"
            assert record.spiffe_id == "spiffe://agents.test/agent/coder"
        # an intercepted destination the coder has no rule for: the tunnel opens (the sidecar
        # does not hold the rules), and the request inside it is refused and audited
        body_file = tmp_path / "body.json"
        done = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-x", proxy, "--cacert", str(ca_cert_path(m.state)),
            "-o", str(body_file), "-w", "%{http_code}", "-d", "{}",
            "https://api.openai.com/v1/chat/completions",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await done.communicate()
        assert out.decode() == "403", err.decode()
        body = json.loads(body_file.read_text())
        assert body["error"] == "egress_denied" and body["destination"] == "openai"
        assert not m.provider.seen


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="dropping CMD to another user needs root; CI runs as root"
)

# The hostile agent (stdlib only: the dropped user cannot run the test venv's interpreter).
HOSTILE = """\
import json, os, socket, ssl, sys, urllib.error, urllib.request
state = sys.argv[1]
out = {"uid": os.getuid(), "read": {}}
for t in (os.path.join(state, "agent-trust", "ca-key.pem"), os.path.join(state, "agent-trust"),
          state):
    try:
        os.listdir(t) if os.path.isdir(t) else open(t, "rb").read(16)
        out["read"][t] = "READ"
    except OSError as e:
        out["read"][t] = e.strerror
bundle = os.environ["SSL_CERT_FILE"]
out["bundle_has_ca"] = "meshgate agent trust CA" in open(bundle).read()
for name, path in (("bundle", bundle), ("beside", os.path.join(os.path.dirname(bundle), "x.pem"))):
    try:
        open(path, "a").write("tampered")
        out[name] = "WROTE"
    except OSError as e:
        out[name] = e.strerror
# the default context and urllib honour SSL_CERT_FILE and HTTPS_PROXY: an allowed call works
req = urllib.request.Request("https://api.openai.com/v1/chat/completions", method="POST",
    data=json.dumps({"model": "gpt-4o-mini", "messages": [], "max_tokens": 1}).encode(),
    headers={"content-type": "application/json"})
out["allowed"] = json.load(urllib.request.urlopen(req, timeout=10))["model"]
# a host that is no destination: the tunnel is refused, no certificate is ever shown
try:
    urllib.request.urlopen("https://evil.example/", timeout=10)
    out["evil"] = "OPENED"
except urllib.error.URLError as e:
    out["evil"] = str(e.reason)
# the agent-trust CA for another name, through an intercepted tunnel: no certificate either
proxy = os.environ["HTTPS_PROXY"].removeprefix("http://")
host, port = proxy.split(":")
sock = socket.create_connection((host, int(port)), timeout=10)
sock.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\\r\\nHost: api.openai.com:443\\r\\n\\r\\n")
head = b""
while b"\\r\\n\\r\\n" not in head:
    head += sock.recv(4096)
try:
    ssl.create_default_context().wrap_socket(sock, server_hostname="evil.example")
    out["forged_sni"] = "HANDSHAKE"
except (ssl.SSLError, OSError) as e:
    out["forged_sni"] = type(e).__name__
print(json.dumps(out))
"""


@needs_root
async def test_a_hostile_agent_cannot_read_the_ca_key_tamper_with_trust_or_borrow_the_ca(
    tmp_path: Path, agent_dir: Path
) -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("agent scripts need /usr/bin/python3")
    async with mesh(tmp_path) as m:
        script = agent_dir / "hostile.py"
        script.write_text(HOSTILE)
        script.chmod(0o644)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshgate.cli", "sidecar", "run", "--agent", "researcher",
            "--control-plane", m.cp.xds_address, "--state-dir", str(tmp_path / "sc"),
            "--insecure",  # the harness's control plane serves plaintext xDS
            "--user", "nobody",
            "--agent-trust-ca", str(ca_cert_path(m.state)),
            "--", "/usr/bin/python3", str(script), str(m.state),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen["uid"] != 0
    assert "READ" not in seen["read"].values(), seen["read"]
    assert seen["bundle_has_ca"] is True
    assert seen["bundle"] == "Permission denied" and seen["beside"] == "Permission denied"
    assert seen["allowed"] == "gpt-4o-mini"
    assert "403" in seen["evil"], seen["evil"]
    # no filter chain for that name: the handshake is cut (an SSLError or a reset)
    assert seen["forged_sni"].startswith(("SSL", "Connection")), seen


async def test_without_a_gateway_the_sidecar_says_so_for_connect_and_https(
    tmp_path: Path,
) -> None:
    """The one refusal a sidecar makes itself: JSON, and a record in its own spool."""
    ca, _, _ = write_test_pki(tmp_path / "pki", HOSTS, "upstream")
    policy = tmp_path / "policies"
    (policy / "secrets").mkdir(parents=True)
    (policy / "mesh.yaml").write_text(
        MESH.format(port=free_port()) + "  secrets: {provider: file, path: ./secrets}\n"
    )
    (policy / "rules.yaml").write_text(POLICY.format(llm=free_port(), echo=free_port(), ca=ca))
    async with (
        control_plane(policy, tmp_path / "state", mtls=True) as cp,
        sidecar(cp, tmp_path, "coder", audit=True) as proxy,
    ):
        status, headers, body = await raw_connect(proxy, "vault.test:443")
        assert status == "HTTP/1.1 503 Service Unavailable"
        assert headers["content-type"] == "application/json"
        refusal = json.loads(body)
        assert refusal["error"] == "gateway_unreachable" and refusal["agent"] == "coder"
        # inside an opened tunnel the same answer, over TLS the agent verified
        done = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-x", proxy, "--cacert", str(ca_cert_path(tmp_path / "state")),
            "https://api.openai.com/v1/models",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await done.communicate()
        assert out and json.loads(out)["error"] == "gateway_unreachable", err.decode()
        records = await until(
            lambda: (rs := audit_records(cp)) and len(rs) >= 2 and rs, 15, "the sidecar's records"
        )
        assert {(r.method, r.host, r.status) for r in records} == {
            ("CONNECT", "vault.test:443", 503),
            ("GET", "api.openai.com", 503),
        }
        assert all(r.gateway == "agent/coder/test" for r in records)


async def test_a_stream_longer_than_envoys_default_route_timeout_arrives_whole(
    tmp_path: Path,
) -> None:
    """Envoy caps a whole response at 15 s unless a route says otherwise: an LLM stream runs
    longer. 4 words 4.5 s apart, through the opened tunnel and the gateway."""
    import httpx
    import openai

    async with mesh(tmp_path) as m, sidecar(m.cp, tmp_path, "researcher") as proxy:
        m.provider.token_delay = 4.5
        trust = ssl.create_default_context(cafile=str(ca_cert_path(m.state)))
        async with httpx.AsyncClient(proxy=proxy, verify=trust, timeout=60) as http:
            client = openai.AsyncOpenAI(api_key="k", http_client=http, max_retries=0)
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "slowly"}],
                max_tokens=4,
                stream=True,
            )
            started = asyncio.get_running_loop().time()
            words = [c.choices[0].delta.content async for c in stream if c.choices]
            took = asyncio.get_running_loop().time() - started
    assert "".join(w or "" for w in words) == "ok ok ok ok"
    assert took > 15


async def test_a_sidecar_without_cmd_says_what_to_trust(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshgate.cli", "sidecar", "run", "--agent", "researcher",
            "--control-plane", m.cp.xds_address, "--state-dir", str(tmp_path / "sc"),
            "--insecure", "--agent-trust-ca", str(ca_cert_path(m.state)),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            while "ready" not in line:
                line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        finally:
            proc.send_signal(2)
            await asyncio.wait_for(proc.wait(), 30)
    assert "HTTP_PROXY=http://127.0.0.1:" in line
    assert f"trust {ca_cert_path(m.state)} besides the system CAs" in line

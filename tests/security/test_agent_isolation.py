"""Issue 17, findings 1, 3, 4 and 6: the agent process cannot borrow another agent's sidecar,
read the mesh's keys, talk to the control plane as a node, or forge the audit trail."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from builders import free_port
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from hostile_mesh import BILLING_SECRET, MESHGATE, Mesh

from meshgate.xds.types import CLUSTER

pytestmark = pytest.mark.e2e

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="dropping CMD to another user needs root; CI runs as root"
)

# The hostile agent: read every key file it can find, abuse its process's privileges.
READ_KEYS = """\
import json, os, sys
state, policies = sys.argv[1], sys.argv[2]
out = {"uid": os.getuid(), "euid": os.geteuid(), "groups": os.getgroups(), "read": {}}
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
out["cap_eff"] = int(status["CapEff"].strip(), 16)
out["cap_prm"] = int(status["CapPrm"].strip(), 16)
out["cap_bnd"] = int(status["CapBnd"].strip(), 16)
out["no_new_privs"] = status["NoNewPrivs"].strip()
targets = [state, os.path.join(state, "tokens", "signing-key.pem"),
           os.path.join(state, "ca"), os.path.join(policies, "secrets", "billing-key")]
for root, dirs, files in os.walk(state):  # whatever it can list, it tries
    targets += [os.path.join(root, f) for f in files]
for t in targets:
    try:
        if os.path.isdir(t):
            os.listdir(t)
        else:
            open(t, "rb").read(64)
        out["read"][t] = "READ"
    except OSError as e:
        out["read"][t] = e.strerror
out["env_secrets"] = sorted(k for k in os.environ
                            if k in ("MESHGATE_ADMIN_TOKEN", "VAULT_TOKEN", "MESHGATE_AUDIT_STORE"))
# the sidecar's Envoy runs as the launcher: its environment and memory are not ours to read
peeks = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if b"envoy" not in open(f"/proc/{pid}/cmdline", "rb").read():
            continue
        open(f"/proc/{pid}/environ", "rb").read(16)
        peeks[pid] = "READ"
    except OSError as e:
        peeks[pid] = e.strerror
out["envoy_environ"] = peeks
print(json.dumps(out))
"""

FORGE_SPOOL = """\
import glob, json, os, sys, time
state = sys.argv[1]
out = {}
forged = json.dumps({"start": str(time.time()), "request_id": "forged-1", "agent": "accountant",
                     "route": "allow/accountant/billing/0/0", "authority": "billing.internal",
                     "method": "GET", "path": "/invoices/forged", "status": "200"}) + "\\n"
for path in [os.path.join(state, "gateway-local", "audit-spool.jsonl"),
             *glob.glob(os.path.join(state, "*", "audit-spool.jsonl"))]:
    try:
        with open(path, "a") as fh:
            fh.write(forged)
        out[path] = "WROTE"
    except OSError as e:
        out[path] = e.strerror
print(json.dumps(out))
"""


@needs_root
def test_the_agent_reads_no_key_token_or_secret(mesh: Mesh) -> None:
    """Finding 3: CMD runs as another user, without capabilities, with the state directory,
    the policy secrets and its sidecar's process out of reach."""
    seen = mesh.agent_python(
        "researcher", READ_KEYS, args=(str(mesh.state_dir), str(mesh.policy_dir))
    )
    assert seen["uid"] != 0 and seen["euid"] != 0
    assert seen["cap_eff"] == 0 and seen["cap_prm"] == 0 and seen["cap_bnd"] == 0
    assert seen["no_new_privs"] == "1"
    assert seen["read"], seen
    assert "READ" not in seen["read"].values(), seen["read"]
    assert seen["env_secrets"] == []
    assert seen["envoy_environ"] and "READ" not in seen["envoy_environ"].values()


@needs_root
def test_launcher_credentials_do_not_reach_the_agent(mesh: Mesh) -> None:
    seen = mesh.agent_python(
        "researcher",
        READ_KEYS,
        args=(str(mesh.state_dir), str(mesh.policy_dir)),
        env={"MESHGATE_ADMIN_TOKEN": "t0ken", "VAULT_TOKEN": "s.vault"},
    )
    assert seen["env_secrets"] == []


@needs_root
def test_the_agent_cannot_forge_audit_records(mesh: Mesh) -> None:
    """Finding 6: spools are out of the agent's reach; nothing it writes becomes a record."""
    seen = mesh.agent_python("researcher", FORGE_SPOOL, args=(str(mesh.state_dir),))
    assert seen and "WROTE" not in seen.values(), seen
    time.sleep(1.5)  # a forged line would have shipped by now
    forged = mesh.audit("--agent", "accountant", min_count=0, timeout=0)
    assert not [r for r in forged if r["path"] == "/invoices/forged"]
    verify = mesh.meshgate("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for path in mesh.state_dir.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o077 == 0, f"{path} is open to other users"
    assert mesh.state_dir.stat().st_mode & 0o077 == 0


PROXY_IDENTITY = """\
import json, urllib.request, urllib.error
codes = []
for _ in range(20):
    try:
        with urllib.request.urlopen("http://billing.internal/invoices", timeout=10) as r:
            codes.append(r.status)
    except urllib.error.HTTPError as e:
        codes.append(e.code)
print(json.dumps({"codes": codes}))
"""


def test_each_sidecar_owns_its_listener(mesh: Mesh) -> None:
    """Finding 1: with another agent's sidecar running on the host, every connection through
    this agent's proxy carries this agent's identity (no shared, reuse-port listener); a
    second sidecar on a taken port fails loudly instead of sharing it."""
    port = free_port()
    other = subprocess.Popen(
        [*MESHGATE, "sidecar", "run", "--agent", "accountant", "--control-plane", mesh.xds,
         "--proxy-port", str(port)],
        cwd=mesh.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert other.stdout is not None
        ready = other.stdout.readline()
        assert f"HTTP_PROXY=http://127.0.0.1:{port}" in ready, ready + _drain(other)
        mesh.upstreams["billing"].clear()
        seen = mesh.agent_python("researcher", PROXY_IDENTITY)
        assert seen["codes"] == [403] * 20
        assert mesh.upstreams["billing"].hits == []

        taken = mesh.agent("researcher", ["/bin/true"], sidecar_args=("--proxy-port", str(port)))
        assert taken.returncode == 1, taken.stdout + taken.stderr
        assert f"127.0.0.1:{port} taken" in taken.stderr, taken.stderr
        assert "Traceback" not in taken.stderr
        # the first sidecar still answers as the accountant
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET http://billing.internal/invoices HTTP/1.1\r\n"
                      b"Host: billing.internal\r\nConnection: close\r\n\r\n")  # fmt: skip
            head = s.recv(4096).split(b"\r\n")[0]
        assert head == b"HTTP/1.1 200 OK", head
    finally:
        other.send_signal(signal.SIGINT)
        other.wait(30)


def _drain(proc: subprocess.Popen[str]) -> str:
    proc.kill()
    out, err = proc.communicate(timeout=10)
    return out + err


def test_xds_refuses_plaintext_and_nodes_without_a_token(mesh: Mesh) -> None:
    """Finding 4: the xDS port of `up` and of plain `serve` is TLS and needs a join token, so
    a local process gets no snapshot (credentials, keys) by asking."""
    host, port = mesh.xds.split(":")
    request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
    request.node.id = "gateway/local"

    def ask(channel: grpc.Channel) -> grpc.StatusCode | None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        try:
            for _ in stub.StreamAggregatedResources(iter([request]), timeout=5):
                return None
        except grpc.RpcError as exc:
            return exc.code()
        return None

    with grpc.insecure_channel(mesh.xds) as plaintext:
        assert ask(plaintext) is not None  # no answer over plaintext
    # TLS, trusting whatever certificate the port shows (an attacker can), but no token
    pem = ssl.get_server_certificate((host, int(port)))
    creds = grpc.ssl_channel_credentials(root_certificates=pem.encode())
    options = (("grpc.ssl_target_name_override", host),)
    with grpc.secure_channel(mesh.xds, creds, options) as tls:
        code = ask(tls)
    assert code is not None and code in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNAVAILABLE,  # the name check failed before the stream
    ), code


def test_gateway_listens_on_loopback_only(mesh: Mesh) -> None:
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    ours = [
        line.split()[1] for line in listening
        if int(line.split()[1].split(":")[1], 16) == mesh.gateway_port and line.split()[3] == "0A"
    ]  # fmt: skip
    assert ours == [f"0100007F:{mesh.gateway_port:04X}"], ours


def test_nodes_refuse_to_start_without_tls_or_token(mesh: Mesh, tmp_path: Path) -> None:
    """A gateway or sidecar pointed at a control plane with nothing to verify it refuses to
    start (no silent plaintext); --insecure is the one explicit way, and it warns."""
    empty = tmp_path / "state"
    gw = mesh.meshgate("gateway", "--control-plane", mesh.xds, "--state-dir", str(empty),
                       timeout=30)  # fmt: skip
    assert gw.returncode == 1 and "no CA to verify the control plane" in gw.stderr, gw.stderr
    assert "Traceback" not in gw.stderr


def test_serve_insecure_is_explicit_and_loud(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*MESHGATE, "serve", "--insecure", "--policies", str(tmp_path / "none"),
         "--state-dir", str(tmp_path / "s"), "--xds-port", str(free_port()),
         "--admin-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 60  # a loaded machine may take a while to start Python
    while "every credential" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    err = seen + err
    assert "WARNING: --insecure" in err and "every credential" in err, err


def test_billing_secret_never_in_agent_view(mesh: Mesh) -> None:
    seen = mesh.agent_python("accountant", PROXY_IDENTITY.replace("range(20)", "range(1)"))
    assert seen["codes"] == [200]
    hit = mesh.upstreams["billing"].hits[-1]
    assert hit["headers"]["x-api-key"] == BILLING_SECRET  # injected at the gateway only

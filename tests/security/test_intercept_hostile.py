"""A hostile agent attacks HTTPS interception (the sidecar answers CONNECT for `tls: originate`
destinations and terminates the agent's TLS with an agent-trust certificate).

`sec-tls` may GET secure.test/v1/* (`tls: originate`, served over TLS by its own CA) and
nothing else; billing.internal (whose key the gateway injects) is the accountant's. Run with
`meshgate sidecar run` as an unprivileged user, the agent:
- opens a tunnel its sidecar intercepts, then sends inside it requests for another host (by
  Host, by absolute URI, with another agent's identity header), a smuggled second request
  (Content-Length and Transfer-Encoding both), a CONNECT in the tunnel (HTTP/1.1 and HTTP/2);
- asks for certificates of names that are no intercepted destination (another SNI in an
  opened tunnel, no SNI at all), and CONNECTs to variants of the destination's authority;
- tries to read the agent-trust CA's key.
Every request is decided by the gateway as for plain HTTP (the tunnel's host grants nothing),
no other host is reached, and every refusal is a refusal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the fixture comes from tests/security/conftest.py
    from hostile_mesh import Mesh

pytestmark = pytest.mark.e2e

SCRIPT = r"""
import json, os, socket, ssl, struct, sys, urllib.error, urllib.parse, urllib.request

proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
gateway_port, upstream_port, state = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = {}


def connect(authority):
    s = socket.create_connection((proxy.hostname, proxy.port), timeout=15)
    s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0
    return s, status


def tls(sock, sni, verify=True):
    ctx = ssl.create_default_context()  # SSL_CERT_FILE: the system CAs and the agent-trust CA
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(sock, server_hostname=sni)


def exchange(raw, sni="secure.test", alpn=None):
    # one intercepted tunnel to secure.test; RAW sent inside; every answer until it closes
    s, status = connect("secure.test:443")
    if status != 200:
        return f"tunnel refused {status}"
    t = tls(s, sni)
    t.sendall(raw)
    data = b""
    try:
        while True:
            chunk = t.recv(65536)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ssl.SSLError, OSError):
        pass
    t.close()
    return data.decode(errors="replace")


def statuses(text):
    return [int(line.split(" ")[1]) for line in text.split("\r\n") if line.startswith("HTTP/1.")]


# honest: https:// through the proxy, verified with the agent-trust CA
try:
    r = urllib.request.urlopen("https://secure.test/v1/ok", timeout=15)
    out["honest"] = [r.status, json.load(r)["upstream"]]
except Exception as e:
    out["honest"] = repr(e)

CLOSE = "Connection: close\r\n"
out["other host"] = statuses(exchange(
    f"GET /invoices HTTP/1.1\r\nHost: billing.internal\r\n{CLOSE}\r\n".encode()))
out["other agent"] = statuses(exchange(
    f"GET /invoices HTTP/1.1\r\nHost: billing.internal\r\nx-meshgate-agent: accountant\r\n"
    f"{CLOSE}\r\n".encode()))
out["absolute uri"] = statuses(exchange(
    f"GET http://billing.internal/invoices HTTP/1.1\r\nHost: secure.test\r\n{CLOSE}\r\n".encode()))
out["smuggled"] = statuses(exchange(
    b"GET /v1/a HTTP/1.1\r\nHost: secure.test\r\nContent-Length: 48\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    b"GET /admin HTTP/1.1\r\nHost: secure.test\r\n\r\n"))
out["connect inside"] = statuses(exchange(
    f"CONNECT billing.internal:80 HTTP/1.1\r\nHost: billing.internal:80\r\n\r\n"
    f"GET /invoices HTTP/1.1\r\nHost: billing.internal\r\n{CLOSE}\r\n".encode()))


def h2_connect(authority):
    # HTTP/2 inside the tunnel (ALPN h2): a CONNECT stream, HPACK literals without indexing
    s, status = connect("secure.test:443")
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2"])
    t = ctx.wrap_socket(s, server_hostname="secure.test")
    if t.selected_alpn_protocol() != "h2":
        return "no h2"

    def lit(name, value):
        return bytes([0, len(name)]) + name + bytes([len(value)]) + value

    block = lit(b":method", b"CONNECT") + lit(b":authority", authority.encode())
    frame = lambda kind, flags, stream, payload: (
        struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
        + payload)
    t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
              + frame(1, 4, 1, block))
    buf, seen = b"", []
    try:
        while True:
            chunk = t.recv(65536)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 9:
                size = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + size:
                    break
                kind, payload, buf = buf[3], buf[9:9 + size], buf[9 + size:]
                if kind == 1:  # HEADERS: 0x88 is ":status: 200" (HPACK static table)
                    seen.append("200" if payload[:1] == b"\x88" else "headers")
                elif kind == 3:
                    seen.append("rst_stream")
                elif kind == 7:
                    seen.append("goaway")
            if seen:
                break
    except (socket.timeout, ssl.SSLError, OSError):
        pass
    t.close()
    return seen


out["h2 connect"] = h2_connect("billing.internal:80")

# certificates: only for intercepted destinations, by the name asked
certs = {}
for sni in ("evil.example", "billing.internal", "vault.test", None):
    s, status = connect("secure.test:443")
    try:
        t = tls(s, sni, verify=sni is not None)
        certs[str(sni)] = "HANDSHAKE " + t.version()
        t.close()
    except (ssl.SSLError, OSError) as e:
        certs[str(sni)] = type(e).__name__
out["certs"] = certs

# CONNECT to variants of the destination's authority, the upstream itself, the gateway
variants = {}
for authority in ("secure.test:8443", "secure.test.:443", f"127.0.0.1:{upstream_port}",
                  f"127.0.0.1:{gateway_port}", "secure.test:443:443", "[::1]:443"):
    s, status = connect(authority)
    s.close()
    variants[authority] = status
out["variants"] = variants

key = os.path.join(state, "agent-trust", "ca-key.pem")
try:
    open(key, "rb").read(1)
    out["ca key"] = "READ"
except OSError as e:
    out["ca key"] = e.strerror
print(json.dumps(out))
"""


def test_interception_grants_nothing_beyond_plain_http(mesh: Mesh) -> None:
    secure, billing = mesh.upstreams["secure"], mesh.upstreams["billing"]
    secure.clear()
    billing.clear()
    seen: dict[str, Any] = mesh.agent_python(
        "sec-tls",
        SCRIPT,
        args=(str(mesh.gateway_port), str(secure.port), str(mesh.state_dir)),
        timeout=120,
    )
    assert seen["honest"] == [200, "secure"]
    # inside the tunnel the gateway decides on the request, as for plain HTTP: billing is not
    # this agent's, whatever tunnel, Host, URI or identity header it comes with
    assert seen["other host"] == [403]
    assert seen["other agent"] == [403]
    assert seen["absolute uri"] == [403]
    # the smuggled request is either refused with the first, or decided on its own (403)
    assert 200 not in seen["smuggled"][1:] and seen["smuggled"], seen["smuggled"]
    assert 200 not in seen["connect inside"], seen["connect inside"]
    assert "200" not in seen["h2 connect"] and seen["h2 connect"], seen["h2 connect"]
    assert not billing.hits, billing.hits
    assert all(h["path"].startswith("/v1/") for h in secure.hits), secure.hits
    assert not [h for h in secure.hits if "admin" in h["path"]]
    # no certificate for a name that is no intercepted destination, nor without a name
    for sni, result in seen["certs"].items():
        assert not result.startswith("HANDSHAKE"), (sni, result)
    assert all(status != 200 for status in seen["variants"].values()), seen["variants"]
    assert seen["ca key"] == "Permission denied"

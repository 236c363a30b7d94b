"""An in-test HTTP server implementing the Vault PKI API paths meshgate uses.

No Vault server can be installed on these machines, so this implements exactly these paths, as
Vault documents them (https://developer.hashicorp.com/vault/api-docs/secret/pki):

- `POST /v1/auth/approle/login` (`role_id`, `secret_id` -> `auth.client_token`);
- `POST /v1/<mount>/root/sign-intermediate` with `X-Vault-Token`: signs the CSR with a real
  root key made by `cryptography` (RSA 2048, Vault's default key type), honouring `common_name`,
  `organization`, `ou`, `use_csr_values`, `ttl` (capped at the mount's max TTL, as Vault does),
  `max_path_length` and `format` (`pem` or `pem_bundle`); answers `certificate`, `issuing_ca`,
  `ca_chain`, `serial_number`, `expiration`;
- `GET /v1/<mount>/ca/pem`: the root as PEM (unauthenticated in Vault too).

Every request body is kept so tests can check what left meshgate (never a private key).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from meshgate.identity.ca import CA_KEY_USAGE


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_root(name: str = "Vault Root CA") -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=30))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _seconds(ttl: str) -> int:
    match = re.fullmatch(r"(\d+)([smhd]?)", ttl)
    if match is None:
        raise ValueError(ttl)
    return int(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


@dataclass
class FakeVaultPki:
    mount: str = "pki"
    max_ttl_seconds: int = 768 * 3600  # Vault's default max lease TTL
    tokens: set[str] = field(default_factory=lambda: {"root-token"})
    approle: dict[str, str] = field(default_factory=lambda: {"role-1": "secret-1"})
    down: bool = False  # every request answers 503 "Vault is sealed"
    delay: float = 0.0  # seconds every request waits before it is answered (a slow Vault)
    requests: list[tuple[str, str, str | None, bytes]] = field(default_factory=list)
    signed: list[x509.Certificate] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self.root, self.root_key = make_root()

    def new_root(self) -> None:
        """Vault's root rotated (a new default issuer on the mount)."""
        self.root, self.root_key = make_root("Vault Root CA 2")

    def sign(self, body: dict[str, Any]) -> dict[str, Any]:
        csr = x509.load_pem_x509_csr(body["csr"].encode())
        assert csr.is_signature_valid
        if body.get("use_csr_values"):
            subject = csr.subject
        else:
            attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in
                     filter(None, str(body.get("organization", "")).split(","))]  # fmt: skip
            attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u) for u in
                      filter(None, str(body.get("ou", "")).split(","))]  # fmt: skip
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, body["common_name"]))
            subject = x509.Name(attrs)
        ttl = min(_seconds(str(body.get("ttl", self.max_ttl_seconds))), self.max_ttl_seconds)
        path_len = int(body.get("max_path_length", -1))
        now = dt.datetime.now(dt.UTC)
        root_ski = self.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.root.subject)
            .public_key(csr.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=30))  # Vault's not_before_duration
            .not_valid_after(now + dt.timedelta(seconds=ttl))
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None if path_len < 0 else path_len),
                critical=True,
            )
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(csr.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
                critical=False,
            )
            .sign(self.root_key, hashes.SHA256())
        )
        self.signed.append(cert)
        certificate = _pem(cert)
        if body.get("format") == "pem_bundle":
            certificate += _pem(self.root)
        return {
            "data": {
                "certificate": certificate,
                "issuing_ca": _pem(self.root),
                "ca_chain": [_pem(self.root)],
                "serial_number": format(cert.serial_number, "x"),
                "expiration": int(cert.not_valid_after_utc.timestamp()),
            }
        }

    def bodies(self) -> bytes:
        return b"".join(body for *_, body in self.requests)


@contextmanager
def fake_vault_pki(state: FakeVaultPki | None = None) -> Iterator[FakeVaultPki]:
    vault = state or FakeVaultPki()
    sign_path = f"/v1/{vault.mount}/root/sign-intermediate"
    ca_path = f"/v1/{vault.mount}/ca/pem"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, body: dict[str, Any] | str) -> None:
            data = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(code)
            ctype = "application/pem-certificate-chain" if isinstance(body, str) else "json"
            self.send_header("Content-Type", ctype if code == 200 else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> bytes:
            time.sleep(vault.delay)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            vault.requests.append((self.command, self.path, self.headers.get("X-Vault-Token"), raw))
            return raw

        def do_POST(self) -> None:
            raw = self._record()
            if vault.down:
                self.reply(503, {"errors": ["Vault is sealed"]})
                return
            body = json.loads(raw or b"{}")
            if self.path == "/v1/auth/approle/login":
                if vault.approle.get(body.get("role_id")) != body.get("secret_id"):
                    self.reply(400, {"errors": ["invalid role or secret id"]})
                    return
                token = f"approle-token-{len(vault.tokens)}"
                vault.tokens.add(token)
                self.reply(200, {"auth": {"client_token": token, "lease_duration": 3600}})
            elif self.path == sign_path:
                if self.headers.get("X-Vault-Token") not in vault.tokens:
                    self.reply(403, {"errors": ["permission denied"]})
                    return
                self.reply(200, vault.sign(body))
            else:
                self.reply(404, {"errors": [f"no handler for route {self.path!r}"]})

        def do_GET(self) -> None:
            self._record()
            if vault.down:
                self.reply(503, {"errors": ["Vault is sealed"]})
            elif self.path == ca_path:
                self.reply(200, _pem(vault.root))
            else:
                self.reply(404, {"errors": []})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    vault.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield vault
    finally:
        server.shutdown()
        server.server_close()

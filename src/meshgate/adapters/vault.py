"""Vault as meshgate uses it: KV version 2 reads (secrets) and the PKI engine (upstream CA).

The Protocols and their in-memory twins live here and need no hvac; the real clients are in
`meshgate.adapters.vault_hvac` (the `vault` extra). Every failure to get an answer (Vault
down, sealed, refusing the token) is `VaultUnavailable` with a one-line reason, so callers can
keep what they have without knowing hvac's or requests' exceptions.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from meshgate.identity.ca import CA_KEY_USAGE


class VaultUnavailable(Exception):
    """Vault did not give an answer (down, sealed, token refused); the text is one short line."""


class VaultKV(Protocol):
    """A KV version 2 mount."""

    def read(self, path: str) -> dict[str, Any] | None:
        """The latest version's data at `path`; None when there is no such secret."""
        ...


class VaultPKI(Protocol):
    """A PKI mount whose root signs meshgate's intermediate CA (the key never leaves meshgate)."""

    def ca_pem(self) -> str:
        """The mount's CA certificate(s), PEM (`GET /v1/<mount>/ca/pem`)."""
        ...

    def sign_intermediate(
        self, csr_pem: str, common_name: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """`POST /v1/<mount>/root/sign-intermediate`: the answer's `data` (`certificate`,
        `issuing_ca`, `ca_chain`, ...). `params`: Vault's parameters (`ttl`, `ou`, ...)."""
        ...


@dataclass
class InMemoryVaultKV:
    """A `VaultKV` twin: `secrets` maps a path to its data; `down` refuses every read."""

    secrets: dict[str, dict[str, Any]] = field(default_factory=dict)
    down: bool = False

    def read(self, path: str) -> dict[str, Any] | None:
        if self.down:
            raise VaultUnavailable("Vault is sealed")
        data = self.secrets.get(path.strip("/"))
        return None if data is None else dict(data)


def _ttl_seconds(ttl: object, default: int) -> int:
    match = re.fullmatch(r"(\d+)([smhd]?)", str(ttl)) if ttl is not None else None
    if match is None:
        return default
    return int(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class InMemoryVaultPKI:
    """A `VaultPKI` twin with its own root (EC P-256, made in memory), signing as Vault does:
    subject from `common_name`, `organization` and `ou` (or the CSR's with `use_csr_values`),
    `ttl` capped at the mount's max TTL, `max_path_length`. `down` refuses every call."""

    def __init__(self, max_ttl_seconds: int = 768 * 3600) -> None:
        self.max_ttl_seconds = max_ttl_seconds
        self.down = False
        self.signed: list[x509.Certificate] = []
        self._lock = threading.Lock()
        self.new_root()

    def new_root(self, name: str = "In-memory Vault Root CA") -> None:
        """Make a new root (Vault's mount got a new default issuer)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.root_key = key
        self.root = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=30))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )

    def _check(self) -> None:
        if self.down:
            raise VaultUnavailable("Vault is sealed")

    def ca_pem(self) -> str:
        self._check()
        return _pem(self.root)

    def sign_intermediate(
        self, csr_pem: str, common_name: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        self._check()
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        if not csr.is_signature_valid:
            raise VaultUnavailable("400: the CSR's signature is invalid")
        if params.get("use_csr_values"):
            subject = csr.subject
        else:
            attrs = [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, o)
                for o in filter(None, str(params.get("organization", "")).split(","))
            ]
            attrs += [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u)
                for u in filter(None, str(params.get("ou", "")).split(","))
            ]
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
            subject = x509.Name(attrs)
        ttl = min(_ttl_seconds(params.get("ttl"), self.max_ttl_seconds), self.max_ttl_seconds)
        path_len = int(params.get("max_path_length", -1))
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise VaultUnavailable("400: unsupported key type in the CSR")
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            root, root_key = self.root, self.root_key
            root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            cert = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(root.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(seconds=30))  # Vault's not_before_duration
                .not_valid_after(now + dt.timedelta(seconds=ttl))
                .add_extension(
                    x509.BasicConstraints(ca=True, path_length=None if path_len < 0 else path_len),
                    critical=True,
                )
                .add_extension(CA_KEY_USAGE, critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
                    critical=False,
                )
                .sign(root_key, hashes.SHA256())
            )
            self.signed.append(cert)
        certificate = _pem(cert)
        if params.get("format") == "pem_bundle":
            certificate += _pem(root)
        return {
            "certificate": certificate,
            "issuing_ca": _pem(root),
            "ca_chain": [_pem(root)],
            "serial_number": format(cert.serial_number, "x"),
            "expiration": int(cert.not_valid_after_utc.timestamp()),
        }

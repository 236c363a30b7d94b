"""The xDS port's own TLS: a serving certificate for the control plane and the file nodes trust.

Kept apart from the workload CA on purpose: the workload CA belongs to a trust domain that only
the policy names, while the xDS port must be up before any policy is read. Operators with their
own PKI pass a certificate and key instead; local launchers find the bundle in the state
directory, the same local-only channel as join tokens.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshgate.identity.ca import (
    CLOCK_SKEW,
    IdentityError,
    SigningKey,
    _make_private_dir,
    authority_key_id,
    cert_pem,
    create_root,
    key_pem,
    new_key,
    now_utc,
    read_certs,
    read_key,
    write_files,
)

XDS_TLS_DIR = "xds-tls"
BUNDLE = "bundle.pem"  # present only while the local control plane serves xDS over TLS
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server.pem", "server-key.pem"
CA_LIFETIME = dt.timedelta(days=3650)
SERVER_LIFETIME = dt.timedelta(days=90)


@dataclass(frozen=True)
class ServingCert:
    chain_pem: bytes
    key_pem: bytes


def bundle_path(state_dir: Path) -> Path:
    return state_dir / XDS_TLS_DIR / BUNDLE


def server_names(host: str) -> list[str]:
    """Every name a local node may dial: the bind host, loopback and this machine's name."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    if host not in ("0.0.0.0", "::", ""):
        names.insert(0, host)
    return list(dict.fromkeys(n.lower() for n in names))


def ensure_serving_cert(state_dir: Path, host: str) -> ServingCert:
    """The built-in xDS CA's serving certificate, re-issued when a third of its life is left or
    the names changed; the CA's bundle is published for local launchers."""
    directory = state_dir / XDS_TLS_DIR
    _make_private_dir(directory)
    if not (directory / CA_CERT).exists():
        root, root_key = create_root("xds.meshgate")
        write_files(
            directory, [(CA_CERT, cert_pem(root), 0o644), (CA_KEY, key_pem(root_key), 0o600)]
        )
    ca_cert = read_certs(directory / CA_CERT)[0]
    ca_key = read_key(directory / CA_KEY)
    names = server_names(host)
    current = _current_server(directory, ca_cert, names)
    if current is None:
        cert, key = _issue_server(ca_cert, ca_key, names)
        current = ServingCert(cert_pem(cert), key_pem(key))
        write_files(
            directory,
            [(SERVER_CERT, current.chain_pem, 0o644), (SERVER_KEY, current.key_pem, 0o600)],
        )
    write_files(directory, [(BUNDLE, cert_pem(ca_cert), 0o644)])
    return current


def withdraw_bundle(state_dir: Path) -> None:
    """Plaintext xDS: local launchers must not try TLS against this control plane."""
    bundle_path(state_dir).unlink(missing_ok=True)


def load_serving_cert(cert_file: Path, key_file: Path) -> ServingCert:
    """An operator's certificate (chain) and key, checked to belong together."""
    chain = read_certs(cert_file)
    key = read_key(key_file)
    if chain[0].public_key() != key.public_key():
        raise IdentityError(f"{key_file}: key does not match the certificate in {cert_file}")
    return ServingCert(b"".join(cert_pem(c) for c in chain), key_pem(key))


def _current_server(
    directory: Path, ca_cert: x509.Certificate, names: list[str]
) -> ServingCert | None:
    try:
        cert = read_certs(directory / SERVER_CERT)[0]
        key = read_key(directory / SERVER_KEY)
    except IdentityError:
        return None
    remaining = cert.not_valid_after_utc - now_utc()
    if (
        cert.issuer != ca_cert.subject
        or cert.public_key() != key.public_key()
        or remaining < SERVER_LIFETIME / 3
        or sorted(_sans(cert)) != sorted(names)
    ):
        return None
    return ServingCert(cert_pem(cert), key_pem(key))


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    dns = ext.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
    return [*dns, *ips]


def _issue_server(
    ca_cert: x509.Certificate, ca_key: SigningKey, names: list[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_key()
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = now_utc()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshgate xDS")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + SERVER_LIFETIME, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(authority_key_id(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key

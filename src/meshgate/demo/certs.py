"""A throwaway CA and server certificate for the demo's stand-ins, so the gateway verifies
them exactly as it verifies a real provider (`caFile`), with nothing switched off."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshgate.identity.ca import CA_KEY_USAGE, cert_pem, key_pem, new_key, now_utc, write_files

LIFETIME = dt.timedelta(days=30)


def write_upstream_pki(ca_dir: Path, key_dir: Path, hosts: list[str]) -> tuple[Path, Path, Path]:
    """(ca.pem in `ca_dir`, cert.pem and its 0600 key in `key_dir`) for `hosts`. The CA's key is
    never written: nothing else can be signed with it once this returns."""
    now = now_utc()
    ca_key, key = new_key(), new_key()
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, "meshgate demo upstream CA"),
        ]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    for directory in (ca_dir, key_dir):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_files(ca_dir, [("upstream-ca.pem", cert_pem(ca), 0o644)])
    write_files(key_dir, [("cert.pem", cert_pem(cert), 0o644), ("key.pem", key_pem(key), 0o600)])
    return ca_dir / "upstream-ca.pem", key_dir / "cert.pem", key_dir / "key.pem"

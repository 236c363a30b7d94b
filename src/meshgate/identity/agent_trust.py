"""The mesh-local "agent trust" CA: it vouches to agents for the destinations their sidecar opens.

An agent's HTTPS client sends `CONNECT api.example.com:443` and then TLS. For a `tls: originate`
destination the sidecar terminates that TLS itself (xds/sidecar.py), so the gateway can apply
methods, paths, tools and credentials as it does to plain HTTP. The agent must then trust the
certificate the sidecar presents: this CA signs it, and agents are told to trust this CA (and
the system store) through SSL_CERT_FILE and friends (sidecar/trust_bundle.py).

Kept apart from the workload CA on purpose: a different key and subject, no SPIFFE names, and
its key never leaves the control plane's state directory (0600): sidecars get only short-lived
per-host leaves, over SDS, which the agent user cannot read. Leaves are issued only for the
hosts of intercepted destinations (`intercepted_hosts`); a host an agent makes up gets no
certificate, so the CA never vouches for it.

No X.509 name constraints: the CA outlives any one policy, and its constraints would have to
list every host a future policy may add. What bounds it is that the control plane signs only
destination hosts, and that the sidecar serves certificates only to its own agent.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshgate.identity.ca import (
    CA_KEY_USAGE,
    CLOCK_SKEW,
    IdentityError,
    SigningKey,
    authority_key_id,
    cert_pem,
    key_pem,
    new_key,
    now_utc,
    read_certs,
)
from meshgate.identity.keyfiles import create_exclusive, load_or_create_key
from meshgate.policy.model import PolicyModel

AGENT_TRUST_DIR = "agent-trust"
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
CA_LIFETIME = dt.timedelta(days=3650)
SUBJECT = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "agent trust"),
        x509.NameAttribute(NameOID.COMMON_NAME, "meshgate agent trust CA"),
    ]
)


def ca_cert_path(state_dir: Path) -> Path:
    """The CA certificate (public) that launchers add to their agents' trust bundle."""
    return state_dir / AGENT_TRUST_DIR / CA_CERT


def intercepted_hosts(model: PolicyModel) -> tuple[str, ...]:
    """Hosts the sidecar opens an agent's CONNECT to: `tls: originate` destinations that did not
    opt out with `intercept: false`. The only names the CA signs."""
    return tuple(
        sorted({d.host for d in model.destinations if d.tls == "originate" and d.intercept})
    )


@dataclass(frozen=True)
class HostCertificate:
    """A leaf for one destination host (and its key, PEM): it travels only in SDS."""

    host: str
    chain_pem: bytes
    key_pem: bytes
    not_before: dt.datetime
    not_after: dt.datetime


class AgentTrustCA:
    def __init__(self, cert: x509.Certificate, key: SigningKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def load_or_create(cls, state_dir: Path) -> AgentTrustCA:
        """Created once per state directory (key 0600); replicas racing use the first one's.
        An operator's CA (EC or RSA key) placed there is used as it is: replicas that do not
        share a state directory (Kubernetes) must share this CA. Blocking (key generation,
        files): call from a worker thread."""
        directory = state_dir / AGENT_TRUST_DIR
        key: SigningKey = load_or_create_key(
            directory / CA_KEY, _generate, _accept, "an EC or RSA private key", IdentityError
        )
        path = directory / CA_CERT
        if not path.exists():  # 0600 like everything in the state dir: launchers run as its owner
            create_exclusive(path, cert_pem(_self_signed(key)))
        cert = read_certs(path)[0]
        if cert.public_key() != key.public_key():
            raise IdentityError(f"{path}: does not belong to the key in {directory / CA_KEY}")
        return cls(cert, key)

    def ca_pem(self) -> bytes:
        return cert_pem(self.cert)

    def issue(self, host: str, ttl: dt.timedelta) -> HostCertificate:
        """A server certificate naming exactly `host` (a DNS name, `*.` wildcard or IP)."""
        key = new_key()
        now = now_utc()
        not_after = min(now + ttl, self.cert.not_valid_after_utc)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(authority_key_id(self.cert), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return HostCertificate(
            host, cert_pem(leaf), key_pem(key), leaf.not_valid_before_utc, leaf.not_valid_after_utc
        )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _generate() -> SigningKey:
    return new_key()


def _accept(key: PrivateKeyTypes) -> SigningKey | None:
    return key if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else None


def _self_signed(key: SigningKey) -> x509.Certificate:
    now = now_utc()
    return (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(SUBJECT)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )

"""The agent-trust CA: its own key and subject, kept private, and leaves that verify for their
one destination host only."""

from __future__ import annotations

import datetime as dt
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from builders import model
from cryptography import x509
from cryptography.x509 import verification

from meshgate.identity.agent_trust import (
    AGENT_TRUST_DIR,
    CA_KEY,
    AgentTrustCA,
    ca_cert_path,
    intercepted_hosts,
)
from meshgate.identity.ca import CertificateAuthority
from meshgate.policy.model import Destination


def verifier(ca: AgentTrustCA, name: str) -> verification.ServerVerifier:
    store = verification.Store([ca.cert])
    return verification.PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))


def leaf_of(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_created_once_private_and_apart_from_the_workload_ca(tmp_path: Path) -> None:
    ca = AgentTrustCA.load_or_create(tmp_path)
    again = AgentTrustCA.load_or_create(tmp_path)
    assert again.ca_pem() == ca.ca_pem() == ca_cert_path(tmp_path).read_bytes()
    directory = tmp_path / AGENT_TRUST_DIR
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / CA_KEY).stat().st_mode) == 0o600
    workload = CertificateAuthority.load_or_create(tmp_path, "agents.test")
    assert ca.cert.subject != workload.root.subject
    assert ca.cert.public_key() != workload.root.public_key()
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0  # signs leaves, never another CA


def test_replicas_racing_share_one_ca(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        cas = list(pool.map(lambda _: AgentTrustCA.load_or_create(tmp_path), range(8)))
    assert len({ca.ca_pem() for ca in cas}) == 1


def test_a_leaf_verifies_for_its_host_and_no_other(tmp_path: Path) -> None:
    ca = AgentTrustCA.load_or_create(tmp_path)
    cert = ca.issue("api.openai.com", dt.timedelta(hours=1))
    leaf = leaf_of(cert.chain_pem)
    verifier(ca, "api.openai.com").verify(leaf, [])
    for other in ("evil.example", "openai.com", "x.api.openai.com"):
        with pytest.raises(verification.VerificationError):
            verifier(ca, other).verify(leaf, [])
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["api.openai.com"]
    assert cert.not_after - cert.not_before <= dt.timedelta(hours=1, minutes=1)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]


def test_wildcard_and_ip_hosts(tmp_path: Path) -> None:
    ca = AgentTrustCA.load_or_create(tmp_path)
    wild = leaf_of(ca.issue("*.tools.example", dt.timedelta(hours=1)).chain_pem)
    verifier(ca, "search.tools.example").verify(wild, [])
    with pytest.raises(verification.VerificationError):
        verifier(ca, "a.b.tools.example").verify(wild, [])
    ip = leaf_of(ca.issue("10.0.0.7", dt.timedelta(hours=1)).chain_pem)
    sans = ip.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]


def test_only_originate_destinations_that_did_not_opt_out_are_intercepted() -> None:
    m = model(
        destinations=(
            Destination("a", "a.example", 443),
            Destination("b", "b.example", 443, intercept=False),
            Destination("c", "c.internal", 80, tls="none"),
            Destination("d", "d.example", 443, tls="passthrough"),
            Destination("e", "a.example", 8443),  # same host, another port: one certificate
        )
    )
    assert intercepted_hosts(m) == ("a.example",)


def test_an_operators_ca_in_the_directory_is_used_as_it_is(tmp_path: Path) -> None:
    """Replicas without a shared state directory (Kubernetes) mount the same CA there."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from meshgate.identity.agent_trust import _self_signed

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    directory = tmp_path / AGENT_TRUST_DIR
    directory.mkdir(mode=0o700)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (directory / CA_KEY).write_bytes(pem)
    cert = _self_signed(key)
    ca_cert_path(tmp_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca = AgentTrustCA.load_or_create(tmp_path)
    assert ca.cert == cert
    verifier(ca, "api.openai.com").verify(
        leaf_of(ca.issue("api.openai.com", dt.timedelta(hours=1)).chain_pem), []
    )

"""The xDS serving certificate: names every local address; reused while fresh, else re-issued."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from meshgate.identity import xds_tls
from meshgate.identity.ca import IdentityError


def sans(pem: bytes) -> set[str]:
    ext = x509.load_pem_x509_certificate(pem).extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    return {
        *san.get_values_for_type(x509.DNSName),
        *map(str, san.get_values_for_type(x509.IPAddress)),
    }


def test_serving_cert_names_chain_and_private_files(tmp_path: Path) -> None:
    cert = xds_tls.ensure_serving_cert(tmp_path, "cp.example")
    names = sans(cert.chain_pem)
    assert {"cp.example", "localhost", "127.0.0.1", "::1"} <= names
    leaf = x509.load_pem_x509_certificate(cert.chain_pem)
    bundle = x509.load_pem_x509_certificate(xds_tls.bundle_path(tmp_path).read_bytes())
    leaf.verify_directly_issued_by(bundle)
    for name in (xds_tls.CA_KEY, xds_tls.SERVER_KEY):
        assert (tmp_path / xds_tls.XDS_TLS_DIR / name).stat().st_mode & 0o777 == 0o600


def test_reused_until_a_third_is_left_or_names_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = xds_tls.ensure_serving_cert(tmp_path, "127.0.0.1")
    assert xds_tls.ensure_serving_cert(tmp_path, "127.0.0.1") == first
    other_host = xds_tls.ensure_serving_cert(tmp_path, "cp.example")
    assert other_host != first and "cp.example" in sans(other_host.chain_pem)
    # pretend the certificate is about to expire: it is re-issued by the same CA
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=70)
    monkeypatch.setattr(xds_tls, "now_utc", lambda: later)
    renewed = xds_tls.ensure_serving_cert(tmp_path, "cp.example")
    assert renewed != other_host


def test_withdrawn_bundle_and_operator_files(tmp_path: Path) -> None:
    served = xds_tls.ensure_serving_cert(tmp_path / "a", "127.0.0.1")
    xds_tls.withdraw_bundle(tmp_path / "a")
    assert not xds_tls.bundle_path(tmp_path / "a").exists()
    d = tmp_path / "a" / xds_tls.XDS_TLS_DIR
    loaded = xds_tls.load_serving_cert(d / xds_tls.SERVER_CERT, d / xds_tls.SERVER_KEY)
    assert loaded == served
    xds_tls.ensure_serving_cert(tmp_path / "b", "127.0.0.1")
    other_key = tmp_path / "b" / xds_tls.XDS_TLS_DIR / xds_tls.SERVER_KEY
    with pytest.raises(IdentityError, match="does not match"):
        xds_tls.load_serving_cert(d / xds_tls.SERVER_CERT, other_key)
    with pytest.raises(IdentityError, match="missing"):
        xds_tls.load_serving_cert(d / "nope.pem", other_key)

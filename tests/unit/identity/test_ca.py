"""The built-in CA: persistence, file modes, chain verification, rotation, and refusals."""

from __future__ import annotations

import datetime as dt
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshgate.errors import MeshgateError
from meshgate.identity import ca as ca_module
from meshgate.identity.ca import CertificateAuthority, IdentityError
from meshgate.identity.certs import IssuedCert, describe, issue, spiffe_id

TD = "mesh.example.com"
AGENT = spiffe_id(TD, "agent", "billing")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path, TD)


def _chain(issued: IssuedCert) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(issued.cert_chain_pem)


def _verify(bundle_pem: bytes, issued: IssuedCert) -> list[x509.GeneralName]:
    """Full path validation as a server checking a client certificate."""
    store = Store(x509.load_pem_x509_certificates(bundle_pem))
    leaf, *intermediates = _chain(issued)
    verifier = PolicyBuilder().store(store).build_client_verifier()
    verified = verifier.verify(leaf, intermediates)
    assert verified.subjects is not None
    return list(verified.subjects)


def test_create_then_load_gives_same_root(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path, TD)
    second = CertificateAuthority.load_or_create(tmp_path, TD)
    assert second.root == first.root
    assert second.intermediate == first.intermediate
    assert second.trust_bundle_pem() == first.trust_bundle_pem()


def test_key_files_0600_and_dir_0700(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    ca_dir = tmp_path / "ca"
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    for name in ("root-key.pem", "intermediate-key.pem"):
        assert stat.S_IMODE((ca_dir / name).stat().st_mode) == 0o600
    assert sorted(p.name for p in ca_dir.iterdir()) == [
        "intermediate-key.pem",
        "intermediate.pem",
        "root-key.pem",
        "root.pem",
    ]


def test_ca_certificates_are_cas(ca: CertificateAuthority) -> None:
    bc = ca.intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    ca.intermediate.verify_directly_issued_by(ca.root)
    ca.root.verify_directly_issued_by(ca.root)
    lifetime = ca.root.not_valid_after_utc - ca.root.not_valid_before_utc
    assert lifetime > dt.timedelta(days=3600)


def test_leaf_verifies_against_bundle(ca: CertificateAuthority) -> None:
    issued = issue(ca, AGENT)
    assert _verify(ca.trust_bundle_pem(), issued) == [x509.UniformResourceIdentifier(AGENT)]
    leaf, inter = _chain(issued)
    leaf.verify_directly_issued_by(inter)
    inter.verify_directly_issued_by(ca.root)


def test_leaf_shape(ca: CertificateAuthority) -> None:
    issued = issue(ca, AGENT, dns_names=["billing.internal"])
    leaf = _chain(issued)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [AGENT]
    assert san.get_values_for_type(x509.DNSName) == ["billing.internal"]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_encipherment and not usage.key_cert_sign
    cn = leaf.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["billing"]
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert issued.serial == leaf.serial_number
    assert b"BEGIN PRIVATE KEY" in issued.key_pem


def test_exactly_one_uri_san(ca: CertificateAuthority) -> None:
    leaf = _chain(issue(ca, spiffe_id(TD, "gateway", "egress")))[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://{TD}/gateway/egress")]


def test_ttl_respected_and_renew_at_half_life(ca: CertificateAuthority) -> None:
    before = dt.datetime.now(dt.UTC)
    issued = issue(ca, AGENT, ttl=dt.timedelta(minutes=20))
    after = dt.datetime.now(dt.UTC)
    # not_before is backdated 1 minute for clock skew; X.509 times have 1 s resolution.
    assert before - dt.timedelta(minutes=1, seconds=1) <= issued.not_before <= after
    assert issued.not_after - issued.not_before == dt.timedelta(minutes=21)
    assert issued.renew_at == issued.not_before + dt.timedelta(minutes=10, seconds=30)
    assert issued.not_before.tzinfo is not None


def test_rotation_keeps_old_leaves_valid(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, TD)
    old_inter, bundle = ca.intermediate, ca.trust_bundle_pem()
    old_leaf = issue(ca, AGENT)
    ca.rotate_intermediate()
    assert ca.intermediate != old_inter
    assert ca.trust_bundle_pem() == bundle
    new_leaf = issue(ca, AGENT)
    _verify(bundle, old_leaf)
    _verify(bundle, new_leaf)
    assert _chain(new_leaf)[1] == ca.intermediate
    _chain(new_leaf)[0].verify_directly_issued_by(ca.intermediate)
    with pytest.raises(Exception):  # noqa: B017 - any signature failure will do
        _chain(new_leaf)[0].verify_directly_issued_by(old_inter)
    reloaded = CertificateAuthority.load_or_create(tmp_path, TD)
    assert reloaded.intermediate == ca.intermediate
    assert not list((tmp_path / "ca").glob(".*.tmp"))
    assert stat.S_IMODE((tmp_path / "ca" / "intermediate-key.pem").stat().st_mode) == 0o600


def test_leaf_from_other_ca_rejected(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other", TD)
    with pytest.raises(VerificationError):
        _verify(ca.trust_bundle_pem(), issue(other, AGENT))


def test_load_from_files(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    loaded = CertificateAuthority.load_from_files(
        ca_dir / "root.pem",
        ca_dir / "intermediate.pem",
        ca_dir / "intermediate-key.pem",
        trust_domain=TD,
    )
    _verify(ca.trust_bundle_pem(), issue(loaded, AGENT))
    with pytest.raises(IdentityError, match="operator-supplied"):
        loaded.rotate_intermediate()


def test_load_from_files_mismatched_key(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = tmp_path / "other"
    CertificateAuthority.load_or_create(other, TD)
    key = other / "ca" / "intermediate-key.pem"
    with pytest.raises(IdentityError, match=r"intermediate-key\.pem: key does not match"):
        CertificateAuthority.load_from_files(
            tmp_path / "ca" / "root.pem", tmp_path / "ca" / "intermediate.pem", key, trust_domain=TD
        )


@pytest.mark.parametrize(
    "name", ["root.pem", "root-key.pem", "intermediate.pem", "intermediate-key.pem"]
)
def test_corrupt_file_names_the_file(tmp_path: Path, name: str) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    (tmp_path / "ca" / name).write_bytes(b"-----BEGIN garbage\n")
    with pytest.raises(IdentityError, match=re.escape(f"/ca/{name}: ")) as err:
        CertificateAuthority.load_or_create(tmp_path, TD)
    assert isinstance(err.value, MeshgateError)
    assert "\n" not in str(err.value)


def test_missing_file_when_others_exist(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    (tmp_path / "ca" / "intermediate-key.pem").unlink()
    with pytest.raises(IdentityError, match=r"intermediate-key\.pem: file is missing"):
        CertificateAuthority.load_or_create(tmp_path, TD)


@pytest.mark.parametrize("td", ["", "Mesh.Example", "a..b", "-x.com", "x_y.com", "a/b"])
def test_bad_trust_domain_rejected(tmp_path: Path, td: str) -> None:
    with pytest.raises(IdentityError, match="invalid trust domain"):
        CertificateAuthority.load_or_create(tmp_path, td)
    with pytest.raises(IdentityError, match="invalid trust domain"):
        spiffe_id(td, "agent", "billing")


@pytest.mark.parametrize(
    "name", ["", "Billing", "a..b", ".a", "a.", "a.B", "a.b.c.d.e", "a/b", "-a", "a" * 64]
)
def test_bad_name_rejected(name: str) -> None:
    with pytest.raises(IdentityError, match="invalid agent name"):
        spiffe_id(TD, "agent", name)


def test_issue_refusals(ca: CertificateAuthority) -> None:
    with pytest.raises(IdentityError, match="invalid SPIFFE ID"):
        issue(ca, f"spiffe://{TD}/user/bob")
    with pytest.raises(IdentityError, match="trust domain"):
        issue(ca, spiffe_id("other.example", "agent", "billing"))
    with pytest.raises(IdentityError, match="TTL"):
        issue(ca, AGENT, ttl=dt.timedelta(0))
    with pytest.raises(IdentityError, match="invalid DNS name"):
        issue(ca, AGENT, dns_names=["Bad_Name"])


def test_describe(ca: CertificateAuthority) -> None:
    issued = issue(ca, AGENT)
    info = describe(issued.cert_chain_pem)
    assert info["spiffe_id"] == AGENT
    assert info["serial"] == format(issued.serial, "x")
    assert dt.datetime.fromisoformat(info["not_after"]) == issued.not_after
    with pytest.raises(IdentityError):
        describe(b"nope")


def test_expiring_intermediate_rotated_on_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = CertificateAuthority.load_or_create(tmp_path, TD)
    monkeypatch.setattr(ca_module, "INTERMEDIATE_MIN_REMAINING", dt.timedelta(days=400))
    second = CertificateAuthority.load_or_create(tmp_path, TD)
    assert second.intermediate != first.intermediate
    assert second.root == first.root


def test_previous_roots_stay_in_bundle(tmp_path: Path) -> None:
    old = CertificateAuthority.load_or_create(tmp_path / "old", TD)
    CertificateAuthority.load_or_create(tmp_path, TD)
    (tmp_path / "ca" / "previous-roots.pem").write_bytes(old.trust_bundle_pem())
    ca = CertificateAuthority.load_or_create(tmp_path, TD)
    assert x509.load_pem_x509_certificates(ca.trust_bundle_pem()) == [ca.root, old.root]
    _verify(ca.trust_bundle_pem(), issue(old, AGENT))

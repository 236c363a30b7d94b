"""The built-in certificate authority that signs workload identities (SPIFFE X.509 SVIDs).

A long-lived root (the trust bundle every proxy pins) signs a short-lived intermediate, and only
the intermediate signs leaves, so the root key is needed only when the intermediate is rotated.
Rotation keeps old leaves valid: each leaf carries the intermediate that signed it, and both
intermediates chain to the same root, so the bundle (roots only) does not change.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from meshgate.errors import MeshgateError

SigningKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

ROOT_LIFETIME = dt.timedelta(days=3650)
INTERMEDIATE_LIFETIME = dt.timedelta(days=365)
# Rotate on start when less than this is left, so leaves never outlive their intermediate.
INTERMEDIATE_MIN_REMAINING = dt.timedelta(days=30)
CLOCK_SKEW = dt.timedelta(minutes=1)

CA_DIR = "ca"
ROOT_CERT = "root.pem"
ROOT_KEY = "root-key.pem"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate-key.pem"
PREVIOUS_ROOTS = "previous-roots.pem"  # optional: old roots still trusted during a root rotation
_REQUIRED = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY)

_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_LABEL_RE = re.compile(rf"^{_LABEL}$")
_DNS_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


class IdentityError(MeshgateError):
    """The CA or a workload identity cannot be created, loaded or issued."""


def validate_trust_domain(trust_domain: str) -> str:
    """A trust domain is the host part of every SPIFFE ID, so it must be a lowercase DNS name."""
    if len(trust_domain) > 253 or not _DNS_RE.fullmatch(trust_domain):
        raise IdentityError(
            f"invalid trust domain {trust_domain!r}: expected a lowercase DNS name "
            "such as 'mesh.example.com'"
        )
    return trust_domain


def validate_label(what: str, value: str) -> str:
    """Workload names become one SPIFFE path segment and a certificate CN: one DNS label."""
    if not _LABEL_RE.fullmatch(value):
        raise IdentityError(
            f"invalid {what} {value!r}: expected a DNS label (a-z, 0-9, '-', at most 63 chars)"
        )
    return value


def validate_dns_name(name: str) -> str:
    if len(name) > 253 or not _DNS_RE.fullmatch(name):
        raise IdentityError(f"invalid DNS name {name!r}: expected a lowercase DNS name")
    return name


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def signature_hash(key: SigningKey) -> hashes.SHA256 | hashes.SHA384:
    """ECDSA P-384 keys get SHA-384 so the hash is not weaker than the curve."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """Prefer the issuer's own SKI, so path building matches even for operator-supplied CAs."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_name(common_name: str, trust_domain: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


# a CA certificate signs certificates and CRLs, nothing else (strict verifiers check it)
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _ca_builder(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    not_after: dt.datetime,
    path_len: int | None,
) -> x509.CertificateBuilder:
    """What a CA certificate needs for strict (webpki-style) verifiers: critical BC and KU, SKI."""
    now = now_utc()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def create_root(trust_domain: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_key()
    name = _ca_name(f"meshgate root CA ({trust_domain})", trust_domain)
    builder = _ca_builder(name, key, now_utc() + ROOT_LIFETIME, None).issuer_name(name)
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    cert = builder.add_extension(aki, critical=False).sign(key, hashes.SHA256())
    return cert, key


def create_intermediate(
    trust_domain: str, root: x509.Certificate, root_key: SigningKey
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """pathlen 0: the intermediate may sign leaves only, never another CA."""
    key = new_key()
    stamp = now_utc().strftime("%Y-%m-%dT%H:%M:%SZ")
    name = _ca_name(f"meshgate intermediate CA ({trust_domain}) {stamp}", trust_domain)
    not_after = min(now_utc() + INTERMEDIATE_LIFETIME, root.not_valid_after_utc)
    builder = _ca_builder(name, key, not_after, 0).issuer_name(root.subject)
    cert = builder.add_extension(authority_key_id(root), critical=False).sign(
        root_key, signature_hash(root_key)
    )
    return cert, key


# -- files ------------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{path}: file is missing") from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read ({exc.strerror})") from None


def read_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise IdentityError(f"{path}: not a PEM certificate (corrupt or wrong file)") from None
    return certs


def read_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IdentityError(
            f"{path}: not an unencrypted PEM private key (corrupt, encrypted or wrong file)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise IdentityError(f"{path}: unsupported key type (expected EC or RSA)")
    return key


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """Write to a fresh temp file beside path; O_EXCL with the final mode, so a key is never
    readable by others, not even for a moment."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise IdentityError(f"{path}: cannot write ({exc.strerror})") from None
    return tmp


def write_files(directory: Path, files: Sequence[tuple[str, bytes, int]]) -> None:
    """Stage every file first, then os.replace them, so a failure leaves the old set intact."""
    staged = [(_stage(directory / n, data, mode), directory / n) for n, data, mode in files]
    try:
        for tmp, final in staged:
            os.replace(tmp, final)
    except OSError as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise IdentityError(f"{directory}: cannot write CA files ({exc.strerror})") from None
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise IdentityError(f"{directory}: cannot create CA directory ({exc.strerror})") from None


# -- consistency checks -----------------------------------------------------------------------


def _same_key(cert: x509.Certificate, key: SigningKey) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def check_chain(
    roots: Sequence[x509.Certificate],
    chain: Sequence[x509.Certificate],
    key: SigningKey,
    chain_file: Path,
    key_file: Path,
) -> None:
    """Fail at load, with the file to fix, rather than issue leaves nobody can verify."""
    if not _same_key(chain[0], key):
        raise IdentityError(f"{key_file}: key does not match the certificate in {chain_file}")
    if not all(_is_ca(c) for c in chain):
        raise IdentityError(f"{chain_file}: certificate is not a CA (basicConstraints CA:false)")
    for child, parent in itertools.pairwise(chain):
        if not _issued_by(child, parent):
            raise IdentityError(f"{chain_file}: certificates are not a chain (leaf-first order)")
    if not any(_issued_by(chain[-1], root) for root in roots):
        raise IdentityError(f"{chain_file}: not signed by the root certificate")


class CertificateAuthority:
    """Signing material plus the roots it chains to. Build with load_or_create/load_from_files."""

    def __init__(
        self,
        trust_domain: str,
        roots: Sequence[x509.Certificate],
        intermediate_chain: Sequence[x509.Certificate],
        intermediate_key: SigningKey,
        *,
        root_key: SigningKey | None = None,
        previous_roots: Sequence[x509.Certificate] = (),
        ca_dir: Path | None = None,
    ) -> None:
        self.trust_domain = validate_trust_domain(trust_domain)
        self.roots = tuple(roots)
        self.previous_roots = tuple(previous_roots)
        self.intermediate_chain = tuple(intermediate_chain)
        self.intermediate_key = intermediate_key
        self._root_key = root_key
        self._ca_dir = ca_dir

    @property
    def root(self) -> x509.Certificate:
        return self.roots[0]

    @property
    def intermediate(self) -> x509.Certificate:
        """The certificate that signs new leaves."""
        return self.intermediate_chain[0]

    def chain_pem(self) -> bytes:
        """Intermediates sent with each leaf (never the root: peers must already trust it)."""
        return b"".join(cert_pem(c) for c in self.intermediate_chain)

    def trust_bundle_pem(self) -> bytes:
        """Roots peers should trust; the previous roots stay in while a root rotation rolls."""
        return b"".join(cert_pem(c) for c in (*self.roots, *self.previous_roots))

    @classmethod
    def load_or_create(cls, state_dir: Path, trust_domain: str) -> CertificateAuthority:
        """First start creates root + intermediate under state_dir/ca; later starts load them."""
        validate_trust_domain(trust_domain)
        ca_dir = Path(state_dir) / CA_DIR
        present = [name for name in _REQUIRED if (ca_dir / name).exists()]
        if not present:
            return cls._create(ca_dir, trust_domain)
        missing = [name for name in _REQUIRED if name not in present]
        if missing:
            raise IdentityError(
                f"{ca_dir / missing[0]}: file is missing but other CA files exist; "
                "restore it or remove the directory to create a new CA"
            )
        ca = cls._load_dir(ca_dir, trust_domain)
        if ca.intermediate.not_valid_after_utc - now_utc() < INTERMEDIATE_MIN_REMAINING:
            ca.rotate_intermediate()
        return ca

    @classmethod
    def _create(cls, ca_dir: Path, trust_domain: str) -> CertificateAuthority:
        _make_private_dir(ca_dir)
        root, root_key = create_root(trust_domain)
        inter, inter_key = create_intermediate(trust_domain, root, root_key)
        write_files(
            ca_dir,
            [
                (ROOT_KEY, key_pem(root_key), 0o600),
                (INTERMEDIATE_KEY, key_pem(inter_key), 0o600),
                (ROOT_CERT, cert_pem(root), 0o644),
                (INTERMEDIATE_CERT, cert_pem(inter), 0o644),
            ],
        )
        return cls(trust_domain, [root], [inter], inter_key, root_key=root_key, ca_dir=ca_dir)

    @classmethod
    def _load_dir(cls, ca_dir: Path, trust_domain: str) -> CertificateAuthority:
        roots = read_certs(ca_dir / ROOT_CERT)
        root_key = read_key(ca_dir / ROOT_KEY)
        if not _same_key(roots[0], root_key):
            raise IdentityError(
                f"{ca_dir / ROOT_KEY}: key does not match the certificate in {ca_dir / ROOT_CERT}"
            )
        chain = read_certs(ca_dir / INTERMEDIATE_CERT)
        key = read_key(ca_dir / INTERMEDIATE_KEY)
        check_chain(roots, chain, key, ca_dir / INTERMEDIATE_CERT, ca_dir / INTERMEDIATE_KEY)
        previous_path = ca_dir / PREVIOUS_ROOTS
        previous = read_certs(previous_path) if previous_path.exists() else []
        return cls(
            trust_domain, roots, chain, key, root_key=root_key, previous_roots=previous,
            ca_dir=ca_dir,
        )  # fmt: skip

    @classmethod
    def load_from_files(
        cls,
        root_cert: Path,
        intermediate_cert: Path,
        intermediate_key: Path,
        *,
        trust_domain: str,
    ) -> CertificateAuthority:
        """An operator-supplied CA. root_cert may hold several roots (all trusted);
        intermediate_cert may hold a chain, signing certificate first. Rotation is the
        operator's job, since meshgate does not hold the root key."""
        roots = read_certs(root_cert)
        chain = read_certs(intermediate_cert)
        key = read_key(intermediate_key)
        check_chain(roots, chain, key, intermediate_cert, intermediate_key)
        return cls(trust_domain, roots, chain, key)

    def rotate_intermediate(self) -> None:
        """New leaves use a fresh intermediate; old leaves carry their own and still verify."""
        if self._root_key is None or self._ca_dir is None:
            raise IdentityError(
                "cannot rotate an operator-supplied CA: supply a new intermediate instead"
            )
        cert, key = create_intermediate(self.trust_domain, self.root, self._root_key)
        # Key first: a crash between the two replaces leaves a mismatch that load reports.
        write_files(
            self._ca_dir,
            [(INTERMEDIATE_KEY, key_pem(key), 0o600), (INTERMEDIATE_CERT, cert_pem(cert), 0o644)],
        )
        self.intermediate_chain = (cert,)
        self.intermediate_key = key

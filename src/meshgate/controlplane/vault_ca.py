"""Vault's PKI engine as the upstream CA: Vault's root signs meshgate's intermediate.

meshgate makes the intermediate key itself and it never leaves this machine (0600 under
`<state>/ca-vault/`): Vault receives only a CSR (`POST /v1/<mount>/root/sign-intermediate`) and
the trust bundle is Vault's root (`GET /v1/<mount>/ca/pem`). Leaves are still signed locally, so
issuance stays fast and goes on while Vault is down. The intermediate is re-signed at 2/3 of its
lifetime and on `meshgate ca rotate`; old leaves keep verifying because every intermediate
chains to the same root. A failed renewal keeps the current (still valid) intermediate and
retries with backoff (`meshgate.retry`). Vault is reached through `meshgate.adapters.vault`
(`VaultPKI`; hvac in `vault_hvac`).

Configured by the operator (`meshgate serve --ca vault ...`), never by policy: whoever chooses
the CA chooses which identities exist, and policy may come from a git repository agents' owners
can write to.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from meshgate.adapters.vault import VaultPKI, VaultUnavailable
from meshgate.errors import ConfigError
from meshgate.identity.ca import (
    CertificateAuthority,
    IdentityError,
    cert_pem,
    check_chain,
    key_pem,
    new_key,
    now_utc,
    read_certs,
    read_key,
    validate_trust_domain,
    write_files,
)
from meshgate.retry import Backoff, Outage

log = logging.getLogger(__name__)

CA_DIR = "ca-vault"
ROOT_CERT = "root.pem"  # Vault's root: the trust bundle
PREVIOUS_ROOTS = "previous-roots.pem"  # after Vault's root changed, until the next renewal
INTERMEDIATE_CERT = "intermediate.pem"  # signed by Vault, then any chain Vault returned
INTERMEDIATE_KEY = "intermediate-key.pem"
SOURCE = "source.txt"  # which Vault, mount and trust domain the stored files belong to
RENEW_FRACTION = 2 / 3
DEFAULT_INTERMEDIATE_TTL = 30 * 86400  # under Vault's default max lease TTL (768h)


@dataclass(frozen=True)
class VaultCASettings:
    """Where Vault's PKI engine is and how to log in; credentials only from the environment."""

    address: str
    mount: str = "pki"
    namespace: str | None = None
    role_id: str | None = None  # AppRole; its secret id is in env secret_id_env
    intermediate_ttl_seconds: int = DEFAULT_INTERMEDIATE_TTL
    token_env: str = "VAULT_TOKEN"
    secret_id_env: str = "VAULT_SECRET_ID"

    @property
    def description(self) -> str:
        return f"vault:{self.address.rstrip('/')}/{self.mount.strip('/')}"


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # wrong signature or unsupported key: not a usable trust anchor
        return False
    return True


def _reason(exc: BaseException) -> str:
    """One short line (VaultUnavailable's text already is)."""
    if isinstance(exc, VaultUnavailable):
        return str(exc)
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def _pem_certs(text: str, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(text.encode())
    except ValueError:
        raise IdentityError(f"{what}: Vault did not return a PEM certificate") from None


class VaultUpstreamCA:
    """The IdentityIssuer's authority source when Vault's PKI engine signs the intermediate."""

    def __init__(
        self,
        settings: VaultCASettings,
        state_dir: Path,
        environ: Mapping[str, str] | None = None,
        *,
        retry_min: float = 5.0,
        retry_max: float = 300.0,
        pki: VaultPKI | None = None,
    ) -> None:
        """`retry_min`/`retry_max`: the renewal backoff; `pki`: the PKI mount (tests pass
        `InMemoryVaultPKI`), by default hvac's, logged in with credentials from `environ`."""
        if settings.intermediate_ttl_seconds <= 0:
            raise ConfigError("vault CA: the intermediate TTL must be positive")
        self.settings = settings
        self.description = settings.description
        env = os.environ if environ is None else environ
        self._pki = pki if pki is not None else _hvac_pki(settings, env)
        self._failures: tuple[type[BaseException], ...] = (VaultUnavailable, IdentityError)
        self._dir = Path(state_dir) / CA_DIR
        self._backoff = Backoff(retry_min, max(retry_min, retry_max))
        self._failed_renewals = 0
        self._retry_at = 0.0
        self._outage = Outage(log)

    # -- AuthoritySource --------------------------------------------------------------------

    def preflight(self) -> None:
        """At start, with no usable intermediate stored, Vault must answer: fail in one line.

        (The trust domain comes with the first policy, so signing itself happens then.)
        """
        stored_for = self._stored_trust_domain()
        if stored_for is not None and self._load_stored(stored_for) is not None:
            return
        try:
            self._read_roots()
        except self._failures as exc:
            raise IdentityError(
                f"{self.description}: cannot reach Vault's PKI engine and no intermediate "
                f"is stored ({_reason(exc)})"
            ) from None

    def load(self, trust_domain: str) -> CertificateAuthority:
        """The stored intermediate, or a newly Vault-signed one when none is stored or due."""
        validate_trust_domain(trust_domain)
        stored = self._load_stored(trust_domain)
        if stored is not None and not self.due(stored):
            return stored
        try:
            return self._sign(trust_domain, stored)
        except self._failures as exc:
            if stored is None:
                raise IdentityError(
                    f"{self.description}: cannot get an intermediate signed ({_reason(exc)})"
                ) from None
            self._failed(stored, exc)
            return stored

    def refresh(self, ca: CertificateAuthority) -> CertificateAuthority | None:
        """A re-signed authority when the current one is due (retries back off); else None."""
        if not self.due(ca) or time.monotonic() < self._retry_at:
            return None
        try:
            return self._sign(ca.trust_domain, ca)
        except self._failures as exc:
            self._failed(ca, exc)
            return None

    def rotate(self, ca: CertificateAuthority) -> CertificateAuthority:
        """`meshgate ca rotate`: a fresh key and a new Vault signature now."""
        try:
            return self._sign(ca.trust_domain, ca)
        except self._failures as exc:
            raise IdentityError(
                f"{self.description}: cannot rotate, Vault did not sign ({_reason(exc)}); "
                "the current intermediate stays in use"
            ) from None

    @staticmethod
    def due(ca: CertificateAuthority) -> bool:
        cert = ca.intermediate
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return now_utc() >= start + (end - start) * RENEW_FRACTION

    # -- Vault ------------------------------------------------------------------------------

    def _read_roots(self) -> list[x509.Certificate]:
        return _pem_certs(self._pki.ca_pem(), f"{self.description}/ca/pem")

    def _sign(
        self, trust_domain: str, previous: CertificateAuthority | None
    ) -> CertificateAuthority:
        key = new_key()
        stamp = now_utc().strftime("%Y-%m-%dT%H:%M:%SZ")
        common_name = f"meshgate intermediate CA ({trust_domain}) {stamp}"
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        params: dict[str, Any] = {
            "ttl": f"{self.settings.intermediate_ttl_seconds}s",
            "format": "pem",
            "max_path_length": 0,  # the intermediate signs leaves only
            "exclude_cn_from_sans": True,
            "use_csr_values": False,
            "organization": "meshgate",
            "ou": trust_domain,
        }
        csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        data = self._pki.sign_intermediate(csr_pem, common_name, params)
        if not isinstance(data.get("certificate"), str):
            raise IdentityError(f"{self.description}: sign-intermediate returned no certificate")
        signed = _pem_certs(data["certificate"], f"{self.description}/root/sign-intermediate")
        above = [
            c
            for pem in data.get("ca_chain") or [data.get("issuing_ca") or ""]
            if pem
            for c in _pem_certs(pem, f"{self.description}/root/sign-intermediate ca_chain")
        ]
        chain = [signed[0], *(c for c in [*signed[1:], *above] if not _self_signed(c))]
        chain = list(dict.fromkeys(chain))  # pem_bundle-style answers repeat the issuer
        roots = [c for c in [*self._read_roots(), *above] if _self_signed(c)]
        roots = list(dict.fromkeys(roots))
        if not roots:
            raise IdentityError(
                f"{self.description}: Vault's CA chain has no self-signed root to trust"
            )
        where = Path(f"{self.description}/root/sign-intermediate")
        check_chain(roots, chain, key, where, self._dir / INTERMEDIATE_KEY)
        old_roots = [] if previous is None else [r for r in previous.roots if r not in roots]
        ca = CertificateAuthority(trust_domain, roots, chain, key, previous_roots=old_roots)
        self._store(ca)
        self._failed_renewals = 0
        self._retry_at = 0.0
        self._outage.recovered("vault CA: %s signs again", self.description)
        log.info(
            "vault CA: intermediate %x signed by %s, valid until %s",
            ca.intermediate.serial_number,
            self.description,
            ca.intermediate.not_valid_after_utc.isoformat(),
        )
        return ca

    def _failed(self, current: CertificateAuthority, exc: BaseException) -> None:
        """Back off; one warning per outage (later failures at debug level)."""
        self._failed_renewals += 1
        delay = self._backoff.delay(self._failed_renewals)
        self._retry_at = time.monotonic() + delay
        self._outage.failed(
            "vault CA: renewing the intermediate at %s failed (%s); keeping the current one "
            "(valid until %s), retrying in %.0fs",
            self.description,
            _reason(exc),
            current.intermediate.not_valid_after_utc.isoformat(),
            delay,
        )

    # -- files ------------------------------------------------------------------------------

    def _source_line(self, trust_domain: str) -> str:
        return f"{self.description} {trust_domain}\n"

    def _stored_trust_domain(self) -> str | None:
        try:
            described, _, trust_domain = (self._dir / SOURCE).read_text().strip().rpartition(" ")
        except OSError:
            return None
        return trust_domain if described == self.description else None

    def _store(self, ca: CertificateAuthority) -> None:
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir.chmod(0o700)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise IdentityError(f"{self._dir}: cannot create ({exc.strerror})") from None
        files: list[tuple[str, bytes, int]] = [
            (INTERMEDIATE_KEY, key_pem(ca.intermediate_key), 0o600),  # key first, as ca.py
            (INTERMEDIATE_CERT, ca.chain_pem(), 0o644),
            (ROOT_CERT, b"".join(cert_pem(r) for r in ca.roots), 0o644),
            (SOURCE, self._source_line(ca.trust_domain).encode(), 0o644),
        ]
        if ca.previous_roots:
            files.append((PREVIOUS_ROOTS, b"".join(cert_pem(r) for r in ca.previous_roots), 0o644))
        write_files(self._dir, files)
        if not ca.previous_roots:
            (self._dir / PREVIOUS_ROOTS).unlink(missing_ok=True)

    def _load_stored(self, trust_domain: str) -> CertificateAuthority | None:
        """None when nothing usable is stored (missing, other Vault or domain, broken, expired)."""
        names: Sequence[str] = (SOURCE, ROOT_CERT, INTERMEDIATE_CERT, INTERMEDIATE_KEY)
        if not all((self._dir / n).exists() for n in names):
            return None
        try:
            if (self._dir / SOURCE).read_text() != self._source_line(trust_domain):
                log.info("vault CA: stored intermediate is for another Vault or trust domain")
                return None
            roots = read_certs(self._dir / ROOT_CERT)
            chain = read_certs(self._dir / INTERMEDIATE_CERT)
            key = read_key(self._dir / INTERMEDIATE_KEY)
            check_chain(
                roots, chain, key, self._dir / INTERMEDIATE_CERT, self._dir / INTERMEDIATE_KEY
            )
            previous_path = self._dir / PREVIOUS_ROOTS
            previous = read_certs(previous_path) if previous_path.exists() else []
        except (OSError, IdentityError) as exc:
            log.warning("vault CA: ignoring the stored intermediate (%s)", exc)
            return None
        if chain[0].not_valid_after_utc <= now_utc() + dt.timedelta(seconds=1):
            return None
        return CertificateAuthority(trust_domain, roots, chain, key, previous_roots=previous)


def _hvac_pki(settings: VaultCASettings, env: Mapping[str, str]) -> VaultPKI:
    try:
        from meshgate.adapters.vault_hvac import HvacVaultPKI, VaultSession
    except ImportError:
        raise ConfigError("--ca vault needs: pip install 'meshgate[vault]'") from None
    session = VaultSession(
        settings.address,
        namespace=settings.namespace,
        token=env.get(settings.token_env, ""),
        role_id=settings.role_id,
        secret_id=env.get(settings.secret_id_env, ""),
        timeout=10,  # renewal runs under the issuer's lock: a hung Vault must not stall it
    )
    if not session.has_credentials:
        raise ConfigError(
            f"--ca vault needs a token (env {settings.token_env}) "
            f"or AppRole (--vault-role-id, secret id in env {settings.secret_id_env})"
        )
    return HvacVaultPKI(session, settings.mount)

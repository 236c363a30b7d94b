"""Workload certificates (X.509 SVIDs): one SPIFFE URI SAN naming an agent or a gateway.

Leaves are short-lived (default 1h) and renewed at half their lifetime, so revocation is
"stop renewing". The private key is returned unencrypted because it travels only inside SDS
to the node it belongs to.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID as OID_EKU
from cryptography.x509.oid import NameOID

from meshgate.delegation import names
from meshgate.identity.ca import (
    CLOCK_SKEW,
    CertificateAuthority,
    IdentityError,
    authority_key_id,
    cert_pem,
    key_pem,
    new_key,
    now_utc,
    signature_hash,
    validate_dns_name,
    validate_label,
    validate_trust_domain,
)

Kind = Literal["agent", "gateway"]
KINDS: tuple[str, ...] = get_args(Kind)
DEFAULT_TTL = dt.timedelta(hours=1)
MAX_TTL = dt.timedelta(days=30)
SCHEME = "spiffe://"


def spiffe_id(trust_domain: str, kind: Kind, name: str) -> str:
    """spiffe://<trust domain>/<kind>/<name>, the identity policy refers to as <name>.

    A sub-agent (`parent.child`, delegation/names.py) is `agent/parent/sub/child`: its
    certificate names the whole chain of agents that delegated to it."""
    validate_trust_domain(trust_domain)
    if kind not in KINDS:
        raise IdentityError(f"invalid identity kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "agent" and names.parent_of(name) is not None:
        if not names.is_agent_name(name):
            raise IdentityError(
                f"invalid agent name {name!r}: a sub-agent's is DNS labels joined by '.', at "
                f"most {names.MAX_DEPTH} below the policy agent"
            )
        return f"{SCHEME}{trust_domain}/{kind}/{names.spiffe_path(name)}"
    validate_label(f"{kind} name", name)
    return f"{SCHEME}{trust_domain}/{kind}/{name}"


def parse_spiffe_id(value: str) -> tuple[str, Kind, str]:
    """(trust domain, kind, name); only the shape meshgate issues is accepted. A sub-agent's
    name is `parent.child` (from `agent/parent/sub/child`)."""
    parts = value.removeprefix(SCHEME).split("/", 2) if value.startswith(SCHEME) else []
    name = parts[2] if len(parts) == 3 else ""
    if len(parts) == 3 and parts[1] == "agent" and "/" in name:
        name = names.agent_from_path(name) or ""
    if len(parts) != 3 or parts[1] not in KINDS or not name or "/" in name:
        raise IdentityError(
            f"invalid SPIFFE ID {value!r}: expected spiffe://<trust-domain>/agent|gateway/<name>"
        )
    trust_domain, kind = parts[0], parts[1]
    checked: Kind = "agent" if kind == "agent" else "gateway"
    if spiffe_id(trust_domain, checked, name) != value:  # validates; one spelling per identity
        raise IdentityError(
            f"invalid SPIFFE ID {value!r}: a sub-agent is agent/<parent>/sub/<name>"
        )
    return trust_domain, checked, name


@dataclass(frozen=True)
class IssuedCert:
    """A leaf and its key, in the PEM forms SDS serves."""

    spiffe_id: str
    cert_chain_pem: bytes  # leaf, then the intermediate(s); never the root
    key_pem: bytes  # PKCS#8, unencrypted
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def renew_at(self) -> dt.datetime:
        """Half-life: leaves room to retry a failed renewal before the old one expires."""
        return self.not_before + (self.not_after - self.not_before) / 2


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _check_ttl(ttl: dt.timedelta) -> None:
    if not dt.timedelta(0) < ttl <= MAX_TTL:
        raise IdentityError(f"invalid certificate TTL {ttl}: expected more than 0 and at most 30d")


def issue(
    ca: CertificateAuthority,
    spiffe_id: str,
    ttl: dt.timedelta = DEFAULT_TTL,
    dns_names: Sequence[str] = (),
    not_after: dt.datetime | None = None,
) -> IssuedCert:
    """Sign a fresh P-256 leaf for spiffe_id, valid for ttl (cut at the intermediate's expiry,
    and at `not_after`: a sub-agent's leaf ends with its delegation)."""
    trust_domain, _, name = parse_spiffe_id(spiffe_id)
    if trust_domain != ca.trust_domain:
        raise IdentityError(f"{spiffe_id}: not in this CA's trust domain {ca.trust_domain!r}")
    _check_ttl(ttl)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    sans += [x509.DNSName(validate_dns_name(d)) for d in dns_names]
    key = new_key()
    now = now_utc()
    not_before = now - CLOCK_SKEW
    ends = min(now + ttl, ca.intermediate.not_valid_after_utc, not_after or now + ttl)
    not_before = min(not_before, ends - dt.timedelta(seconds=1))  # an ended delegation: expired
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.intermediate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(ends)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_usage(), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([OID_EKU.SERVER_AUTH, OID_EKU.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(authority_key_id(ca.intermediate), critical=False)
    )
    leaf = builder.sign(ca.intermediate_key, signature_hash(ca.intermediate_key))
    return IssuedCert(
        spiffe_id=spiffe_id,
        cert_chain_pem=cert_pem(leaf) + ca.chain_pem(),
        key_pem=key_pem(key),
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )


def describe(pem: bytes | str) -> dict[str, Any]:
    """The fields `meshgate identity show` prints, from the first (leaf) certificate in pem."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        leaf = x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise IdentityError("not a PEM certificate") from None
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return {
        "spiffe_id": next((u for u in uris if u.startswith(SCHEME)), None),
        "serial": format(leaf.serial_number, "x"),
        "not_before": leaf.not_valid_before_utc.isoformat(),
        "not_after": leaf.not_valid_after_utc.isoformat(),
    }

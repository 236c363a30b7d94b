"""Vault's PKI engine as the upstream CA, against an in-test Vault API server.

No Vault server can be installed on these machines, so `tests/fake_vault_pki.py` implements
exactly the Vault API paths meshgate uses (`POST /v1/auth/approle/login`,
`POST /v1/<mount>/root/sign-intermediate`, `GET /v1/<mount>/ca/pem`), signing with a real root
key made by `cryptography`.
"""

from __future__ import annotations

import datetime as dt
import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import free_port, model
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from fake_vault_pki import FakeVaultPki, fake_vault_pki

from meshgate.controlplane import vault_ca
from meshgate.controlplane.identity import IdentityIssuer
from meshgate.controlplane.vault_ca import VaultCASettings, VaultUpstreamCA
from meshgate.errors import ConfigError
from meshgate.identity.ca import IdentityError
from meshgate.xds.mtls import NodeIdentity

TOKEN_ENV = {"VAULT_TOKEN": "root-token"}


@pytest.fixture
def vault() -> Iterator[FakeVaultPki]:
    with fake_vault_pki() as state:
        yield state


def _source(
    vault: FakeVaultPki, state_dir: Path, env: dict[str, str] | None = None, **settings: object
) -> VaultUpstreamCA:
    retry = settings.pop("retry_min", 5.0)
    config = VaultCASettings(vault.url, **settings)  # type: ignore[arg-type]
    return VaultUpstreamCA(config, state_dir, TOKEN_ENV if env is None else env, retry_min=retry)  # type: ignore[arg-type]


def _verify(bundle_pem: bytes, ident: NodeIdentity) -> list[x509.Certificate]:
    """Full path validation as the gateway does for a client: leaf -> intermediate -> root."""
    leaf, *intermediates = x509.load_pem_x509_certificates(ident.chain_pem)
    verifier = (
        PolicyBuilder()
        .store(Store(x509.load_pem_x509_certificates(bundle_pem)))
        .build_client_verifier()
    )
    return list(verifier.verify(leaf, intermediates).chain)


def _root_pem(vault: FakeVaultPki) -> bytes:
    return vault.root.public_bytes(serialization.Encoding.PEM)


def _later(monkeypatch: pytest.MonkeyPatch, delta: dt.timedelta) -> None:
    """Move the renewal clock only; certificates are still issued at the real time."""
    real = vault_ca.now_utc
    monkeypatch.setattr(vault_ca, "now_utc", lambda: real() + delta)


def test_intermediate_signed_by_vault_and_leaves_chain_to_vault_root(
    vault: FakeVaultPki, tmp_path: Path
) -> None:
    issuer = IdentityIssuer(tmp_path, source=_source(vault, tmp_path))
    ident = issuer.identities(model()).agents["researcher"]

    assert ident.trust_bundle_pem == _root_pem(vault)  # what SDS sends as the validation context
    chain = _verify(ident.trust_bundle_pem, ident)
    assert [c.subject for c in chain[1:]] == [vault.signed[0].subject, vault.root.subject]
    inter = vault.signed[0]
    assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert "agents.local" in inter.subject.rfc4514_string()

    sign = [r for r in vault.requests if r[1] == "/v1/pki/root/sign-intermediate"]
    assert len(sign) == 1 and sign[0][0] == "POST" and sign[0][2] == "root-token"
    body = json.loads(sign[0][3])
    assert body["csr"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert body["max_path_length"] == 0 and body["format"] == "pem"
    assert ("GET", "/v1/pki/ca/pem") in [(m, p) for m, p, *_ in vault.requests]
    # the intermediate's key was made here and never sent: Vault saw a CSR, no key of any kind
    assert b"PRIVATE KEY" not in vault.bodies()
    key_file = tmp_path / "ca-vault" / "intermediate-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert issuer.authority() == {
        "source": f"vault:{vault.url}/pki",
        "intermediate_serial": format(inter.serial_number, "x"),
        "intermediate_not_after": inter.not_valid_after_utc.isoformat(),
    }


def test_approle_login_then_the_token_it_gave(tmp_path: Path) -> None:
    with fake_vault_pki(FakeVaultPki(mount="pki-mesh")) as vault:
        source = _source(
            vault, tmp_path, {"VAULT_SECRET_ID": "secret-1"}, mount="pki-mesh", role_id="role-1"
        )
        ca = source.load("agents.local")
    assert vault.requests[0][:2] == ("POST", "/v1/auth/approle/login")
    sign = next(r for r in vault.requests if r[1] == "/v1/pki-mesh/root/sign-intermediate")
    assert sign[2] is not None and sign[2].startswith("approle-token-")
    assert ca.roots == (vault.root,)


def test_restart_loads_the_stored_intermediate_while_vault_is_down(
    vault: FakeVaultPki, tmp_path: Path
) -> None:
    first = _source(vault, tmp_path).load("agents.local")
    vault.down = True
    again = _source(vault, tmp_path)
    again.preflight()  # something is stored: starting does not need Vault
    loaded = again.load("agents.local")
    assert loaded.intermediate == first.intermediate and loaded.roots == first.roots
    assert len(vault.signed) == 1
    # another trust domain needs a new signature, which a sealed Vault cannot give: one line
    with pytest.raises(IdentityError, match=r"cannot get an intermediate signed") as err:
        again.load("other.local")
    assert "\n" not in str(err.value)


def test_vault_unreachable_at_start_with_nothing_stored_is_one_line(tmp_path: Path) -> None:
    config = VaultCASettings(f"http://127.0.0.1:{free_port()}")
    source = VaultUpstreamCA(config, tmp_path, TOKEN_ENV)
    with pytest.raises(IdentityError, match=r"cannot reach Vault's PKI engine") as err:
        source.preflight()
    assert "\n" not in str(err.value) and "no intermediate is stored" in str(err.value)


def test_renewed_at_two_thirds_old_and_new_leaves_both_verify(
    vault: FakeVaultPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    issuer = IdentityIssuer(tmp_path, source=_source(vault, tmp_path))
    old = issuer.identities(model()).agents["researcher"]
    _later(monkeypatch, dt.timedelta(days=19))  # 30 d intermediate: not yet due
    assert issuer.identities(model()).agents["researcher"] == old
    _later(monkeypatch, dt.timedelta(days=21))  # past 2/3
    new = issuer.identities(model()).agents["researcher"]
    assert len(vault.signed) == 2 and new.chain_pem != old.chain_pem
    assert new.trust_bundle_pem == old.trust_bundle_pem == _root_pem(vault)
    assert _verify(new.trust_bundle_pem, old)[1] == vault.signed[0]  # old leaf still verifies
    assert _verify(new.trust_bundle_pem, new)[1] == vault.signed[1]
    stored = x509.load_pem_x509_certificates((tmp_path / "ca-vault/intermediate.pem").read_bytes())
    assert stored == [vault.signed[1]]


def test_vault_down_at_renewal_keeps_serving_and_retries_with_backoff(
    vault: FakeVaultPki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    issuer = IdentityIssuer(tmp_path, source=_source(vault, tmp_path, retry_min=0.3))
    old = issuer.identities(model()).agents["researcher"]
    vault.down = True
    _later(monkeypatch, dt.timedelta(days=21))
    assert issuer.identities(model()).agents["researcher"] == old  # no error, same certificate
    assert "keeping the current one" in caplog.text
    tries = len(vault.requests)
    assert issuer.identities(model()).agents["researcher"] == old
    assert len(vault.requests) == tries  # backing off: Vault is not asked again yet
    vault.down = False
    time.sleep(0.35)
    renewed = issuer.identities(model()).agents["researcher"]
    assert renewed != old and len(vault.signed) == 2
    assert _verify(renewed.trust_bundle_pem, renewed)[1] == vault.signed[1]


def test_rotate_resigns_now_and_fails_clearly_when_vault_is_down(
    vault: FakeVaultPki, tmp_path: Path
) -> None:
    issuer = IdentityIssuer(tmp_path, source=_source(vault, tmp_path))
    old = issuer.identities(model()).agents["researcher"]
    serial = issuer.rotate()
    assert serial == vault.signed[1].serial_number
    new = issuer.identities(model()).agents["researcher"]
    assert _verify(new.trust_bundle_pem, old)[1] == vault.signed[0]
    assert _verify(new.trust_bundle_pem, new)[1] == vault.signed[1]
    vault.down = True
    with pytest.raises(IdentityError, match="cannot rotate") as err:
        issuer.rotate()
    assert "\n" not in str(err.value)
    assert issuer.identities(model()).agents["researcher"] == new  # still serving


def test_a_new_vault_root_keeps_the_old_one_trusted_until_the_next_renewal(
    vault: FakeVaultPki, tmp_path: Path
) -> None:
    issuer = IdentityIssuer(tmp_path, source=_source(vault, tmp_path))
    old_root = vault.root
    old = issuer.identities(model()).agents["researcher"]
    vault.new_root()
    issuer.rotate()
    new = issuer.identities(model()).agents["researcher"]
    bundle = x509.load_pem_x509_certificates(new.trust_bundle_pem)
    assert bundle == [vault.root, old_root]
    assert _verify(new.trust_bundle_pem, old)[-1] == old_root
    assert _verify(new.trust_bundle_pem, new)[-1] == vault.root
    issuer.rotate()  # the next renewal: old leaves are long gone
    latest = issuer.identities(model()).agents["researcher"]
    assert x509.load_pem_x509_certificates(latest.trust_bundle_pem) == [vault.root]
    assert not (tmp_path / "ca-vault/previous-roots.pem").exists()


def test_bad_token_and_missing_credentials(vault: FakeVaultPki, tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match=r"Forbidden: permission denied"):
        _source(vault, tmp_path, {"VAULT_TOKEN": "wrong"}).load("agents.local")
    with pytest.raises(ConfigError, match=r"needs a token \(env VAULT_TOKEN\)"):
        _source(vault, tmp_path, {})
    assert not (tmp_path / "ca-vault" / "intermediate-key.pem").exists()


def test_start_needs_vault_when_the_stored_intermediate_expired(
    vault: FakeVaultPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _source(vault, tmp_path).load("agents.local")
    vault.down = True
    _later(monkeypatch, dt.timedelta(days=31))
    with pytest.raises(IdentityError, match=r"no intermediate is stored \(VaultDown"):
        _source(vault, tmp_path).preflight()


def test_a_corrupt_stored_intermediate_is_replaced_by_a_new_signature(
    vault: FakeVaultPki, tmp_path: Path
) -> None:
    first = _source(vault, tmp_path).load("agents.local")
    (tmp_path / "ca-vault" / "intermediate-key.pem").write_text("not a key")
    again = _source(vault, tmp_path).load("agents.local")
    assert again.intermediate != first.intermediate and len(vault.signed) == 2

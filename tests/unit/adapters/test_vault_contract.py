"""One contract, two Vault clients: hvac against the in-test Vault API servers
(tests/fake_vault_kv.py, tests/fake_vault_pki.py) and the in-memory twins. Each test body runs
against both, so the twins are proven to answer as the real clients do."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_vault_kv import FakeVault, fake_vault_kv
from fake_vault_pki import fake_vault_pki

from meshgate.adapters.vault import (
    InMemoryVaultKV,
    InMemoryVaultPKI,
    VaultKV,
    VaultPKI,
    VaultUnavailable,
)
from meshgate.adapters.vault_hvac import HvacVaultKV, HvacVaultPKI, VaultSession
from meshgate.controlplane import vault_ca
from meshgate.controlplane.vault import VaultSecrets
from meshgate.controlplane.vault_ca import VaultCASettings, VaultUpstreamCA

# -- KV -----------------------------------------------------------------------------------------


class KVControls:
    """Writes a secret and takes Vault down, on the fake server or the twin."""

    def __init__(self, target: FakeVault | InMemoryVaultKV) -> None:
        self.target = target

    def put(self, path: str, value: str) -> None:
        if isinstance(self.target, FakeVault):
            self.target.kv[f"secret/{path}"] = value
        else:
            self.target.secrets[path] = {"value": value}

    def down(self, down: bool) -> None:
        self.target.down = down


@pytest.fixture(params=["hvac", "in-memory"])
def kv(request: pytest.FixtureRequest) -> Iterator[tuple[VaultKV, KVControls]]:
    if request.param == "hvac":
        with fake_vault_kv() as (state, url):
            yield HvacVaultKV(VaultSession(url, token="root-token"), "secret"), KVControls(state)
    else:
        twin = InMemoryVaultKV()
        yield twin, KVControls(twin)


def test_kv_reads_data_and_missing_is_none(kv: tuple[VaultKV, KVControls]) -> None:
    client, controls = kv
    controls.put("meshgate/llm-key", "sk-1")
    assert client.read("meshgate/llm-key") == {"value": "sk-1"}
    assert client.read("meshgate/other") is None
    controls.down(True)
    with pytest.raises(VaultUnavailable) as err:
        client.read("meshgate/llm-key")
    assert "\n" not in str(err.value) and str(err.value)


def test_the_secret_provider_runs_on_the_twin() -> None:
    twin = InMemoryVaultKV({"agents/llm": {"key": "sk-2", "value": "other"}})
    options = {"address": "http://vault:8200", "path": "agents", "field": "key", "ttl": "0"}
    provider = VaultSecrets(options, {}, kv=twin)
    assert provider.read("llm") == "sk-2" and provider.read("nope") is None
    twin.secrets["agents/llm"] = {"key": "sk-3"}
    assert provider.read("llm") == "sk-3"  # ttl 0: read again
    twin.down = True
    assert provider.read("llm") == "sk-3"  # Vault down: the last value is kept
    assert provider.read("never-read") is None


# -- PKI ----------------------------------------------------------------------------------------


@pytest.fixture(params=["hvac", "in-memory"])
def pki(request: pytest.FixtureRequest) -> Iterator[tuple[VaultPKI, Any]]:
    """The client and what backs it (both have `down`, `signed` and `max_ttl_seconds`)."""
    if request.param == "hvac":
        with fake_vault_pki() as state:
            yield HvacVaultPKI(VaultSession(state.url, token="root-token"), "pki"), state
    else:
        twin = InMemoryVaultPKI()
        yield twin, twin


def _csr(cn: str = "ignored") -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def test_pki_signs_an_intermediate_under_its_root(pki: tuple[VaultPKI, Any]) -> None:
    client, _ = pki
    [root] = x509.load_pem_x509_certificates(client.ca_pem().encode())
    assert root.issuer == root.subject
    csr_pem, key = _csr()
    params = {"ttl": "3600s", "organization": "meshgate", "ou": "agents.local",
              "max_path_length": 0, "format": "pem"}  # fmt: skip
    data = client.sign_intermediate(csr_pem, "meshgate intermediate", params)
    [cert] = x509.load_pem_x509_certificates(data["certificate"].encode())
    cert.verify_directly_issued_by(root)
    assert cert.public_key() == key.public_key()
    names = {a.oid: a.value for a in cert.subject}
    assert names == {
        NameOID.COMMON_NAME: "meshgate intermediate",
        NameOID.ORGANIZATION_NAME: "meshgate",
        NameOID.ORGANIZATIONAL_UNIT_NAME: "agents.local",
    }
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=58) < lifetime <= dt.timedelta(hours=1)
    assert [x509.load_pem_x509_certificate(p.encode()) for p in data["ca_chain"]] == [root]
    assert x509.load_pem_x509_certificate(data["issuing_ca"].encode()) == root


def test_pki_caps_the_ttl_and_bundles_on_request(pki: tuple[VaultPKI, Any]) -> None:
    client, backing = pki
    csr_pem, _ = _csr()
    data = client.sign_intermediate(csr_pem, "cn", {"ttl": "100000h", "format": "pem_bundle"})
    cert, root = x509.load_pem_x509_certificates(data["certificate"].encode())
    assert root.issuer == root.subject
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert lifetime <= dt.timedelta(seconds=backing.max_ttl_seconds)
    assert lifetime > dt.timedelta(seconds=backing.max_ttl_seconds - 120)


def test_pki_down_is_vault_unavailable(pki: tuple[VaultPKI, Any]) -> None:
    client, backing = pki
    backing.down = True
    with pytest.raises(VaultUnavailable):
        client.ca_pem()
    with pytest.raises(VaultUnavailable):
        client.sign_intermediate(_csr()[0], "cn", {})
    assert backing.signed == []


def test_the_upstream_ca_runs_on_either(pki: tuple[VaultPKI, Any], tmp_path: Path) -> None:
    client, backing = pki
    source = VaultUpstreamCA(VaultCASettings("http://vault:8200"), tmp_path, {}, pki=client)
    source.preflight()
    ca = source.load("agents.local")
    assert ca.intermediate == backing.signed[0]
    [root] = x509.load_pem_x509_certificates(client.ca_pem().encode())
    assert list(ca.roots) == [root]
    ca.intermediate.verify_directly_issued_by(root)
    backing.down = True
    # stored and not yet due: no Vault needed
    assert source.load("agents.local").intermediate == ca.intermediate


def test_upstream_ca_renewal_backs_off_and_warns_once_per_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    twin = InMemoryVaultPKI()
    source = VaultUpstreamCA(
        VaultCASettings("http://vault:8200"), tmp_path, {}, retry_min=0.2, retry_max=0.4, pki=twin
    )
    ca = source.load("agents.local")
    real = vault_ca.now_utc
    monkeypatch.setattr(vault_ca, "now_utc", lambda: real() + dt.timedelta(days=21))  # due
    twin.down = True
    delays = []
    for _ in range(4):
        start = time.monotonic()
        assert source.refresh(ca) is None  # fails: keeps the current one
        assert source.refresh(ca) is None  # backing off: not even tried
        delays.append(source._retry_at - start)
        time.sleep(max(0.0, source._retry_at - time.monotonic()) + 0.01)
    assert 0.1 <= delays[0] <= 0.21 and all(0.2 <= d <= 0.41 for d in delays[2:])
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "keeping the current one" in warnings[0].getMessage()
    twin.down = False
    renewed = source.refresh(ca)
    assert renewed is not None and renewed.intermediate == twin.signed[-1]
    assert "signs again" in caplog.text
    assert len(twin.signed) == 2  # the first, and the renewal: failed tries signed nothing

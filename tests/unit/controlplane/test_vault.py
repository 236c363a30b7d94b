"""The Vault secret provider against an in-test HTTP server (tests/fake_vault_kv.py).

No Vault server can be installed on these machines, so that server implements exactly the Vault
API paths the provider uses: `POST /v1/auth/approle/login` and KV v2
`GET /v1/<mount>/data/<path>` with the `X-Vault-Token` header.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_vault_kv import FakeVault, fake_vault_kv

from meshgate.controlplane.secrets import make_provider
from meshgate.controlplane.vault import VaultSecrets
from meshgate.errors import ConfigError
from meshgate.policy.model import SecretsConfig


@pytest.fixture
def vault() -> Iterator[tuple[FakeVault, str]]:
    with fake_vault_kv() as served:
        yield served


def test_token_auth_reads_kv2_and_missing_is_none(vault: tuple[FakeVault, str]) -> None:
    state, url = vault
    state.kv["secret/meshgate/llm-key"] = "sk-from-vault"
    provider = VaultSecrets({"address": url}, {"VAULT_TOKEN": "root-token"})
    assert provider.read("llm-key") == "sk-from-vault"
    assert provider.read("absent") is None
    assert ("GET", "/v1/secret/data/meshgate/llm-key") in state.requests


def test_approle_login_custom_mount_path_and_ttl(vault: tuple[FakeVault, str]) -> None:
    state, url = vault
    state.kv["kv/agents/llm-key"] = "v1"
    options = {"address": url, "mount": "kv", "path": "agents", "roleId": "role-1", "ttl": "0"}
    provider = VaultSecrets(options, {"VAULT_SECRET_ID": "secret-1"})
    assert provider.read("llm-key") == "v1"
    assert state.requests[0] == ("POST", "/v1/auth/approle/login")
    state.kv["kv/agents/llm-key"] = "v2"  # rotated in Vault: ttl 0 re-reads at once
    assert provider.read("llm-key") == "v2"


def test_cached_within_ttl_and_last_value_kept_when_vault_fails(
    vault: tuple[FakeVault, str],
) -> None:
    state, url = vault
    state.kv["secret/meshgate/k"] = "first"
    cached = VaultSecrets({"address": url, "ttl": "60"}, {"VAULT_TOKEN": "root-token"})
    assert cached.read("k") == "first"
    state.kv["secret/meshgate/k"] = "second"
    assert cached.read("k") == "first"  # within ttl: no request
    fresh = VaultSecrets({"address": url, "ttl": "0"}, {"VAULT_TOKEN": "root-token"})
    assert fresh.read("k") == "second"
    state.down = True
    assert fresh.read("k") == "second"  # sealed/unreachable: keep serving the last value


def test_bad_token_gives_no_value(vault: tuple[FakeVault, str]) -> None:
    state, url = vault
    state.kv["secret/meshgate/k"] = "x"
    assert VaultSecrets({"address": url}, {"VAULT_TOKEN": "wrong"}).read("k") is None


def test_configuration_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="needs an address"):
        VaultSecrets({}, {})
    with pytest.raises(ConfigError, match="needs a token"):
        VaultSecrets({"address": "http://127.0.0.1:1"}, {})
    monkeypatch.setenv("VAULT_TOKEN", "from-env")
    provider = make_provider(
        SecretsConfig(provider="vault", options=(("address", "http://127.0.0.1:1"),))
    )
    assert provider.description.startswith("vault:")

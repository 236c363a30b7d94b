"""The Vault secret provider against an in-test HTTP server.

No Vault server can be installed on these machines, so this server implements exactly the Vault
API paths the provider uses: `POST /v1/auth/approle/login` and KV v2
`GET /v1/<mount>/data/<path>` with the `X-Vault-Token` header.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from meshgate.controlplane.secrets import make_provider
from meshgate.controlplane.vault import VaultSecrets
from meshgate.errors import ConfigError
from meshgate.policy.model import SecretsConfig


class FakeVault:
    def __init__(self) -> None:
        self.kv: dict[str, str] = {}  # "<mount>/<path>" -> value
        self.tokens = {"root-token"}
        self.approle = {"role-1": "secret-1"}
        self.requests: list[tuple[str, str]] = []
        self.down = False


@pytest.fixture
def vault() -> Iterator[tuple[FakeVault, str]]:
    state = FakeVault()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            state.requests.append(("POST", self.path))
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/auth/approle/login" and state.approle.get(
                body.get("role_id")
            ) == body.get("secret_id"):
                token = f"approle-token-{len(state.tokens)}"
                state.tokens.add(token)
                self.reply(200, {"auth": {"client_token": token, "lease_duration": 3600}})
            else:
                self.reply(400, {"errors": ["invalid role or secret id"]})

        def do_GET(self) -> None:
            state.requests.append(("GET", self.path))
            if state.down:
                self.reply(503, {"errors": ["Vault is sealed"]})
                return
            if self.headers.get("X-Vault-Token") not in state.tokens:
                self.reply(403, {"errors": ["permission denied"]})
                return
            mount, _, rest = self.path.removeprefix("/v1/").partition("/data/")
            value = state.kv.get(f"{mount}/{rest}")
            if value is None:
                self.reply(404, {"errors": []})
                return
            self.reply(200, {"data": {"data": {"value": value}, "metadata": {"version": 1}}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


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

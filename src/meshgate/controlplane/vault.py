"""Vault as the secret provider: KV version 2 read through `hvac`, token or AppRole login.

Settings come from the Mesh (`secrets: {provider: vault, address: ..., ...}`):
`mount` (default `secret`), `path` (prefix, default `meshgate`), `field` (default `value`),
`namespace`, `ttl` (seconds a value is reused, default 30), and either a token in the
environment variable named by `tokenEnv` (default `VAULT_TOKEN`) or AppRole with `roleId` and
the secret id in the environment variable named by `secretIdEnv`. No credential is ever
written in policy. A Vault that cannot be reached keeps the last values it gave.

`VaultSession` (client plus login) is shared with the Vault PKI upstream CA (`vault_ca.py`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import hvac
import requests
from hvac import exceptions as hvac_errors

from meshgate.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
# What a Vault call raises when Vault is down, sealed, or refuses: callers keep what they have.
VAULT_FAILURES = (hvac_errors.VaultError, requests.RequestException)


class VaultSession:
    """An hvac client and how it logs in: a token from the environment, or AppRole.

    Credentials come only from the environment (never policy or the command line). With AppRole
    a 403 means the login token expired: log in again once and retry.
    """

    def __init__(
        self,
        address: str,
        *,
        namespace: str | None = None,
        token: str = "",
        role_id: str | None = None,
        secret_id: str = "",
        timeout: float = 30,
    ) -> None:
        self.address = address
        self._role_id = role_id
        self._secret_id = secret_id
        self._token = token
        self.client = hvac.Client(url=address, namespace=namespace, timeout=timeout)
        self.client.token = None  # hvac would pick VAULT_TOKEN up itself; we decide (tokenEnv)

    @property
    def has_credentials(self) -> bool:
        return bool(self._role_id or self._token)

    def call(self, request: Callable[[Any], T]) -> T:
        """request(client), logged in first; with AppRole, one re-login on 403."""
        self._login_if_needed()
        try:
            return request(self.client)
        except hvac_errors.Forbidden:
            if not self._role_id:
                raise
            self.client.token = None  # AppRole token expired: log in again once
            self._login_if_needed()
            return request(self.client)

    def _login_if_needed(self) -> None:
        if self.client.token:
            return
        if self._role_id:
            self.client.auth.approle.login(role_id=self._role_id, secret_id=self._secret_id)
        else:
            self.client.token = self._token


class VaultSecrets:
    def __init__(self, options: Mapping[str, str], environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        try:
            self.address = options["address"]
        except KeyError:
            raise ConfigError("secrets: vault needs an address") from None
        self.mount = options.get("mount", "secret")
        self.prefix = options.get("path", "meshgate").strip("/")
        self.field = options.get("field", "value")
        self.ttl = float(options.get("ttl", "30"))
        self.description = f"vault:{self.address}/{self.mount}/{self.prefix}"
        self._session = VaultSession(
            self.address,
            namespace=options.get("namespace"),
            token=env.get(options.get("tokenEnv", "VAULT_TOKEN"), ""),
            role_id=options.get("roleId"),
            secret_id=env.get(options.get("secretIdEnv", "VAULT_SECRET_ID"), ""),
        )
        if not self._session.has_credentials:
            raise ConfigError(
                "secrets: vault needs a token (env VAULT_TOKEN or tokenEnv) or AppRole (roleId)"
            )
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def read(self, name: str) -> str | None:
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and time.monotonic() < cached[0]:
                return cached[1]
            try:
                value = self._fetch(name)
            except VAULT_FAILURES as exc:
                log.warning(
                    "vault: reading %r failed (%s); keeping the last value",
                    name,
                    type(exc).__name__,
                )
                return cached[1] if cached else None
            self._cache[name] = (time.monotonic() + self.ttl, value)
            return value

    def _fetch(self, name: str) -> str | None:
        def read(client: Any) -> dict[str, Any] | None:
            try:
                resp: dict[str, Any] = client.secrets.kv.v2.read_secret_version(
                    path=f"{self.prefix}/{name}",
                    mount_point=self.mount,
                    raise_on_deleted_version=True,
                )
            except hvac_errors.InvalidPath:
                return None
            return resp

        resp = self._session.call(read)
        if resp is None:
            return None
        value = resp.get("data", {}).get("data", {}).get(self.field)
        return value if isinstance(value, str) else None

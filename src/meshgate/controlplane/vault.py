"""Vault as the secret provider: KV version 2 read through `hvac`, token or AppRole login.

Settings come from the Mesh (`secrets: {provider: vault, address: ..., ...}`):
`mount` (default `secret`), `path` (prefix, default `meshgate`), `field` (default `value`),
`namespace`, `ttl` (seconds a value is reused, default 30), and either a token in the
environment variable named by `tokenEnv` (default `VAULT_TOKEN`) or AppRole with `roleId` and
the secret id in the environment variable named by `secretIdEnv`. No credential is ever
written in policy. A Vault that cannot be reached keeps the last values it gave.

Vault itself is reached through `meshgate.adapters.vault` (`VaultKV`; hvac in `vault_hvac`,
whose session is shared with the Vault PKI upstream CA).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping

from meshgate.adapters.vault import VaultKV, VaultUnavailable
from meshgate.durations import parse_duration
from meshgate.errors import ConfigError

log = logging.getLogger(__name__)


class VaultSecrets:
    def __init__(
        self,
        options: Mapping[str, str],
        environ: Mapping[str, str] | None = None,
        kv: VaultKV | None = None,
    ):
        """`kv`: the KV mount to read (tests pass `InMemoryVaultKV`); by default hvac's,
        logged in with the credentials from `environ`."""
        env = os.environ if environ is None else environ
        try:
            self.address = options["address"]
        except KeyError:
            raise ConfigError("secrets: vault needs an address") from None
        self.mount = options.get("mount", "secret")
        self.prefix = options.get("path", "meshgate").strip("/")
        self.field = options.get("field", "value")
        self.ttl = parse_duration(str(options.get("ttl", "30")), "secrets.ttl").total_seconds()
        self.description = f"vault:{self.address}/{self.mount}/{self.prefix}"
        self._kv = kv if kv is not None else self._hvac_kv(options, env)
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def _hvac_kv(self, options: Mapping[str, str], env: Mapping[str, str]) -> VaultKV:
        try:
            from meshgate.adapters.vault_hvac import HvacVaultKV, VaultSession
        except ImportError:
            raise ConfigError(
                "secrets provider vault needs: pip install 'meshgate[vault]'"
            ) from None

        session = VaultSession(
            self.address,
            namespace=options.get("namespace"),
            token=env.get(options.get("tokenEnv", "VAULT_TOKEN"), ""),
            role_id=options.get("roleId"),
            secret_id=env.get(options.get("secretIdEnv", "VAULT_SECRET_ID"), ""),
        )
        if not session.has_credentials:
            raise ConfigError(
                "secrets: vault needs a token (env VAULT_TOKEN or tokenEnv) or AppRole (roleId)"
            )
        return HvacVaultKV(session, self.mount)

    def read(self, name: str) -> str | None:
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and time.monotonic() < cached[0]:
                return cached[1]
            try:
                data = self._kv.read(f"{self.prefix}/{name}")
            except VaultUnavailable as exc:
                log.warning("vault: reading %r failed (%s); keeping the last value", name, exc)
                return cached[1] if cached else None
            value = None if data is None else data.get(self.field)
            value = value if isinstance(value, str) else None
            self._cache[name] = (time.monotonic() + self.ttl, value)
            return value

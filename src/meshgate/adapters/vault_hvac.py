"""The real Vault clients, through hvac (the `vault` extra): a session (token or AppRole login)
shared by the KV reader (secret provider) and the PKI signer (upstream CA).

hvac's and requests' exceptions stop here: callers see `VaultUnavailable` with a one-line reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import hvac
import requests
from hvac import exceptions as hvac_errors

from meshgate.adapters.vault import VaultUnavailable

T = TypeVar("T")
# What a Vault call raises when Vault is down, sealed, or refuses.
HVAC_FAILURES = (hvac_errors.VaultError, requests.RequestException)


def reason(exc: BaseException) -> str:
    """One short line: requests' connection errors repeat the URL and a nested repr."""
    name = type(exc).__name__
    if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout"):
        return f"{name}: Vault did not answer"
    text = " ".join(str(exc).split()).split(", on ")[0][:160]  # hvac appends the method and URL
    return f"{name}: {text}" if text else name


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except HVAC_FAILURES as exc:
        raise VaultUnavailable(reason(exc)) from None


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


class HvacVaultKV:
    """`VaultKV` over hvac: `GET /v1/<mount>/data/<path>`."""

    def __init__(self, session: VaultSession, mount: str) -> None:
        self.session = session
        self.mount = mount

    def read(self, path: str) -> dict[str, Any] | None:
        def read(client: Any) -> dict[str, Any] | None:
            try:
                resp: dict[str, Any] = client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=self.mount, raise_on_deleted_version=True
                )
            except hvac_errors.InvalidPath:
                return None
            return resp

        with _translated():
            resp = self.session.call(read)
        if resp is None:
            return None
        data = resp.get("data", {}).get("data")
        return data if isinstance(data, dict) else {}


class HvacVaultPKI:
    """`VaultPKI` over hvac."""

    def __init__(self, session: VaultSession, mount: str) -> None:
        self.session = session
        self.mount = mount

    def ca_pem(self) -> str:
        with _translated():
            text: str = self.session.call(
                lambda c: c.secrets.pki.read_ca_certificate(mount_point=self.mount)
            )
        return text

    def sign_intermediate(
        self, csr_pem: str, common_name: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        with _translated():
            resp: Any = self.session.call(
                lambda c: c.secrets.pki.sign_intermediate(
                    csr_pem, common_name, extra_params=dict(params), mount_point=self.mount
                )
            )
        data = resp.get("data") if isinstance(resp, dict) else None
        return data if isinstance(data, dict) else {}

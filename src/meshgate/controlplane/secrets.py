"""Secret providers: where credential values come from. Values never leave this module except
into SDS Secret resources for gateways; they are never logged or put in status."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

from meshgate.errors import ConfigError
from meshgate.policy.model import PolicyModel, SecretsConfig


class SecretProvider(Protocol):
    description: str

    def read(self, name: str) -> str | None:
        """The secret's value, or None when the provider has no such secret."""


class FileSecrets:
    """One file per secret under a directory; trailing newlines are dropped."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.description = f"file:{directory}"

    def read(self, name: str) -> str | None:
        try:
            return (self.directory / name).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError):
            return None


class EnvSecrets:
    """`MESHGATE_SECRET_<NAME>`, NAME upper-cased with '-' and '.' as '_'."""

    description = "env:MESHGATE_SECRET_*"

    def read(self, name: str) -> str | None:
        return os.environ.get(env_name(name))


def env_name(name: str) -> str:
    return "MESHGATE_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def make_provider(config: SecretsConfig) -> SecretProvider:
    if config.provider == "file":
        return FileSecrets(Path(config.path or "secrets"))
    if config.provider == "env":
        return EnvSecrets()
    if config.provider == "vault":
        try:
            from meshgate.controlplane.vault import VaultSecrets
        except ImportError:
            raise ConfigError(
                "secrets provider vault needs: pip install 'meshgate[vault]'"
            ) from None
        return VaultSecrets(dict(config.options))
    raise ConfigError(f"secrets provider {config.provider!r} is not available in this build")


def read_secrets(model: PolicyModel, provider: SecretProvider) -> dict[str, str]:
    """Values of every secret the policy's credentials name; missing ones are left out."""
    values: dict[str, str] = {}
    for dest in model.destinations:
        if dest.credentials is not None:
            value = provider.read(dest.credentials.secret)
            if value is not None:
                values[dest.credentials.secret] = value
    return values

"""Settings of the translation that come from the deployment, not from policy."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True)
class TranslateOptions:
    gateway_bind: str = "127.0.0.1"
    system_ca_file: str = DEFAULT_CA_BUNDLE  # trust for `tls: originate` without a caFile
    gateway_address: tuple[str, int] | None = None  # where sidecars reach the gateway

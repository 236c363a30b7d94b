"""Settings of the translation that come from the deployment, not from policy."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True)
class TranslateOptions:
    gateway_bind: str = "0.0.0.0"
    system_ca_file: str = DEFAULT_CA_BUNDLE  # trust for `tls: originate` without a caFile
    sidecar_port: int = 15080  # loopback HTTP proxy port of every sidecar (agents' HTTP_PROXY)
    gateway_address: tuple[str, int] | None = None  # where sidecars reach the gateway

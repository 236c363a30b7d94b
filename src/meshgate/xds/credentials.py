"""Credential injection at the gateway: the value travels only as an SDS Secret.

Each destination with credentials gets its own credential-injector filter, wrapped in a matcher
that skips it unless the request's authority is that destination (the injector has no per-route
config); it names an SDS secret holding the whole header value and overwrites any header of that
name the agent sent. Refused requests never reach the upstream, so only allowed ones carry it.
"""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.filters.http.credential_injector.v3 import credential_injector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.injected_credentials.generic.v3 import generic_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from meshgate.policy.model import Destination
from meshgate.xds.common import ads, only_for_authorities, pack


def filter_name(dest: Destination) -> str:
    return f"meshgate.credentials.{dest.name}"


def secret_name(dest: Destination) -> str:
    return f"credential-{dest.name}"


def injector_filter(dest: Destination) -> hcm_pb2.HttpFilter:
    return only_for_authorities(
        filter_name(dest), pack(injector(dest)), (dest.host, f"{dest.host}:{dest.port}")
    )


def injector(dest: Destination) -> credential_injector_pb2.CredentialInjector:
    assert dest.credentials is not None
    generic = generic_pb2.Generic(
        credential=secret_pb2.SdsSecretConfig(name=secret_name(dest), sds_config=ads()),
        header=dest.credentials.header,
    )
    return credential_injector_pb2.CredentialInjector(
        overwrite=True,
        credential=extension_pb2.TypedExtensionConfig(
            name="envoy.http.injected_credentials.generic", typed_config=pack(generic)
        ),
    )


def credential_secret(dest: Destination, value: str) -> secret_pb2.Secret:
    assert dest.credentials is not None
    header_value = dest.credentials.format.replace("{secret}", value)
    return secret_pb2.Secret(
        name=secret_name(dest),
        generic_secret=secret_pb2.GenericSecret(
            secret=base_pb2.DataSource(inline_string=header_value)
        ),
    )


def has_credential(dest: Destination, secrets: Mapping[str, str]) -> bool:
    return dest.credentials is not None and dest.credentials.secret in secrets

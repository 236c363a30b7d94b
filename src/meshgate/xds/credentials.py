"""Credential injection at the gateway: the value travels only as an SDS Secret.

Each destination with credentials gets its own credential-injector filter, wrapped in a matcher
that skips it unless the request's authority is that destination (the injector has no per-route
config); it names an SDS secret holding the whole header value and overwrites any header of that
name the agent sent. Refused requests never reach the upstream, so only allowed ones carry it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.composite.v3 import composite_pb2
from envoy.extensions.filters.http.credential_injector.v3 import credential_injector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.injected_credentials.generic.v3 import generic_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from xds.core.v3 import extension_pb2 as core_extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from meshgate.policy.model import Destination
from meshgate.xds.common import ads, authority_matcher, pack


def filter_name(dest: Destination) -> str:
    return f"meshgate.credentials.{dest.name}"


def secret_name(dest: Destination) -> str:
    return f"credential-{dest.name}"


INJECTOR_FILTER = "meshgate.credentials"


def injector_filter(dests: list[Destination], others: Sequence[Destination]) -> hcm_pb2.HttpFilter:
    """One filter for every destination: a hash lookup on :authority picks the injector (a
    wildcard's after the exact names of `others`, every destination of the policy)."""
    by_destination = {}
    for dest in dests:
        by_destination[dest] = matcher_pb2.Matcher.OnMatch(
            action=core_extension_pb2.TypedExtensionConfig(
                name=f"inject-{dest.name}",
                typed_config=pack(
                    composite_pb2.ExecuteFilterAction(
                        typed_config=extension_pb2.TypedExtensionConfig(
                            name=filter_name(dest), typed_config=pack(injector(dest))
                        )
                    )
                ),
            )
        )
    tree = authority_matcher(by_destination, others)
    wrapped = extension_matcher_pb2.ExtensionWithMatcher(
        xds_matcher=tree,
        extension_config=extension_pb2.TypedExtensionConfig(
            name="composite", typed_config=pack(composite_pb2.Composite())
        ),
    )
    return hcm_pb2.HttpFilter(name=INJECTOR_FILTER, typed_config=pack(wrapped))


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

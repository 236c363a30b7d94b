"""Workload identity on the wire: SDS secrets and TLS contexts for sidecar <-> gateway mTLS.

Certificates and the trust bundle reach nodes only as SDS Secrets on their own ADS stream. With
mTLS the gateway sets the agent header itself, from the verified client certificate's SPIFFE
ID, before any route is chosen; whatever the sender put there is removed first.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import wrappers_pb2

from meshgate.xds.common import ads, pack

IDENTITY_SECRET = "meshgate-identity"
TRUST_SECRET = "meshgate-trust"


@dataclass(frozen=True)
class NodeIdentity:
    """A node's certificate chain and key (PEM) and the bundle it trusts."""

    spiffe_id: str
    chain_pem: bytes
    key_pem: bytes
    trust_bundle_pem: bytes


def identity_secrets(ident: NodeIdentity, peer_spiffe_prefix: str) -> list[secret_pb2.Secret]:
    """The node's own certificate, and the trust it applies to its peer (by SPIFFE ID prefix)."""
    return [
        secret_pb2.Secret(
            name=IDENTITY_SECRET,
            tls_certificate=common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=ident.chain_pem),
                private_key=base_pb2.DataSource(inline_bytes=ident.key_pem),
            ),
        ),
        secret_pb2.Secret(
            name=TRUST_SECRET,
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(inline_bytes=ident.trust_bundle_pem),
                match_typed_subject_alt_names=[
                    common_pb2.SubjectAltNameMatcher(
                        san_type=common_pb2.SubjectAltNameMatcher.URI,
                        matcher=string_pb2.StringMatcher(prefix=peer_spiffe_prefix),
                    )
                ],
            ),
        ),
    ]


def _common() -> tls_pb2.CommonTlsContext:
    return tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[
            secret_pb2.SdsSecretConfig(name=IDENTITY_SECRET, sds_config=ads())
        ],
        validation_context_sds_secret_config=secret_pb2.SdsSecretConfig(
            name=TRUST_SECRET, sds_config=ads()
        ),
    )


def gateway_tls() -> tls_pb2.DownstreamTlsContext:
    return tls_pb2.DownstreamTlsContext(
        common_tls_context=_common(),
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
    )


def sidecar_tls() -> tls_pb2.UpstreamTlsContext:
    return tls_pb2.UpstreamTlsContext(common_tls_context=_common())


def identity_from_certificate(header: str) -> extension_pb2.TypedExtensionConfig:
    """Early header mutation: replace `header` with the verified peer's SPIFFE ID."""
    mutation = header_mutation_pb2.HeaderMutation(
        mutations=[
            mutation_rules_pb2.HeaderMutation(remove=header),
            mutation_rules_pb2.HeaderMutation(
                append=base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=header, value="%DOWNSTREAM_PEER_URI_SAN%"),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ),
        ]
    )
    return extension_pb2.TypedExtensionConfig(
        name="meshgate.identity-from-certificate", typed_config=pack(mutation)
    )

"""Tool JWTs at the gateway: which agent is calling, signed by the control plane.

Each (agent, destination) pair gets its own token as an SDS generic secret, so a renewal is an
SDS push only. One composite filter picks the injector by a hash lookup on the authority, then
on the agent header, which under mTLS the gateway has just set from the verified certificate;
the injector overwrites whatever the agent sent in that header.
"""

from __future__ import annotations

from collections.abc import Mapping

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

from meshgate.policy.model import Destination, PolicyModel
from meshgate.xds.allowlist import AGENT_HEADER
from meshgate.xds.common import ads, authority_matcher, header_exact_match, pack

TOOL_IDENTITY_FILTER = "meshgate.tool-identity"
BEARER_HEADER = "authorization"
FALLBACK_HEADER = "x-meshgate-identity"  # when a credential already fills authorization

# (agent name, destination name) -> the signed JWT
ToolTokens = Mapping[tuple[str, str], str]


def jwt_header(dest: Destination) -> str:
    """Authorization (Bearer) unless the destination's injected credential uses it."""
    if dest.credentials is not None and dest.credentials.header.lower() == BEARER_HEADER:
        return FALLBACK_HEADER
    return BEARER_HEADER


def tool_identity_pairs(model: PolicyModel) -> list[tuple[str, Destination]]:
    """Every (agent, destination) that needs a token: `identity: jwt`, granted, and HTTP-visible.

    A passthrough destination's requests are opaque TLS to the gateway, so nothing can be added.
    """
    jwt_dests = {
        d.name: d for d in model.destinations if d.identity == "jwt" and d.tls != "passthrough"
    }
    pairs: dict[tuple[str, str], Destination] = {}
    for agent in model.agents:
        for rule in agent.rules:
            dest = jwt_dests.get(rule.destination) if rule.enforced else None
            if dest is not None:
                pairs[(agent.agent, dest.name)] = dest
    return [(agent, dest) for (agent, _), dest in sorted(pairs.items(), key=lambda kv: kv[0])]


def secret_name(agent: str, dest: Destination) -> str:
    return f"tool-jwt-{dest.name}-{agent}"


def tool_identity_resources(
    model: PolicyModel, tokens: ToolTokens
) -> tuple[hcm_pb2.HttpFilter | None, list[secret_pb2.Secret]]:
    """The injector filter and one secret per pair that has a token (none: no filter)."""
    pairs = [(a, d) for a, d in tool_identity_pairs(model) if (a, d.name) in tokens]
    if not pairs:
        return None, []
    secrets = [_secret(agent, dest, tokens[(agent, dest.name)]) for agent, dest in pairs]
    return _filter(model, pairs), secrets


def _secret(agent: str, dest: Destination, token: str) -> secret_pb2.Secret:
    value = f"Bearer {token}" if jwt_header(dest) == BEARER_HEADER else token
    return secret_pb2.Secret(
        name=secret_name(agent, dest),
        generic_secret=secret_pb2.GenericSecret(secret=base_pb2.DataSource(inline_string=value)),
    )


def _filter(model: PolicyModel, pairs: list[tuple[str, Destination]]) -> hcm_pb2.HttpFilter:
    by_dest: dict[str, tuple[Destination, dict[str, matcher_pb2.Matcher.OnMatch]]] = {}
    for agent, dest in pairs:
        callers = by_dest.setdefault(dest.name, (dest, {}))[1]
        # under mTLS the gateway has replaced the agent header with the certificate's SPIFFE ID
        callers[model.spiffe_id(agent)] = _inject(agent, dest)
    by_destination = {
        dest: matcher_pb2.Matcher.OnMatch(matcher=header_exact_match(AGENT_HEADER, callers))
        for dest, callers in by_dest.values()
    }
    wrapped = extension_matcher_pb2.ExtensionWithMatcher(
        xds_matcher=authority_matcher(by_destination, model.destinations),
        extension_config=extension_pb2.TypedExtensionConfig(
            name="composite", typed_config=pack(composite_pb2.Composite())
        ),
    )
    return hcm_pb2.HttpFilter(name=TOOL_IDENTITY_FILTER, typed_config=pack(wrapped))


def _inject(agent: str, dest: Destination) -> matcher_pb2.Matcher.OnMatch:
    generic = generic_pb2.Generic(
        credential=secret_pb2.SdsSecretConfig(name=secret_name(agent, dest), sds_config=ads()),
        header=jwt_header(dest),
    )
    injector = credential_injector_pb2.CredentialInjector(
        overwrite=True,  # an agent cannot present a token of its own making
        credential=extension_pb2.TypedExtensionConfig(
            name="envoy.http.injected_credentials.generic", typed_config=pack(generic)
        ),
    )
    return matcher_pb2.Matcher.OnMatch(
        action=core_extension_pb2.TypedExtensionConfig(
            name=f"tool-jwt-{dest.name}-{agent}",
            typed_config=pack(
                composite_pb2.ExecuteFilterAction(
                    typed_config=extension_pb2.TypedExtensionConfig(
                        name=f"{TOOL_IDENTITY_FILTER}.{dest.name}", typed_config=pack(injector)
                    )
                )
            ),
        )
    )

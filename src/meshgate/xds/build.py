"""Model -> one snapshot per node group."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from meshgate.identity.agent_trust import HostCertificate
from meshgate.policy.model import PolicyModel
from meshgate.xds.gateway import Endpoints, gateway_resources
from meshgate.xds.mtls import NodeIdentity, identity_secrets
from meshgate.xds.nodes import GATEWAY_GROUP
from meshgate.xds.options import TranslateOptions
from meshgate.xds.sidecar import (
    GATEWAY_CLUSTER,
    INTERCEPT_CLUSTER,
    INTERCEPT_LISTENER,
    Intercepted,
    agent_routes,
    gateway_cluster,
    intercept_cluster,
    intercept_listener,
    intercept_secrets,
    route_name,
)
from meshgate.xds.snapshot import Resource, Snapshot
from meshgate.xds.tool_identity import ToolTokens


def resource_name(message: object) -> str:
    name = getattr(message, "name", "") or getattr(message, "cluster_name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"resource without a name: {type(message).__name__}")
    return name


@dataclass(frozen=True)
class Identities:
    """Certificates the control plane issued: the gateways' and each agent's (mTLS mode)."""

    gateway: NodeIdentity
    agents: Mapping[str, NodeIdentity]
    tool_tokens: ToolTokens = field(default_factory=dict)  # (agent, destination) -> JWT
    # agent-trust leaves of intercepted destination hosts (identity/agent_trust.py), by host
    intercept: Mapping[str, HostCertificate] = field(default_factory=dict)


def gateway_snapshot(
    model: PolicyModel,
    options: TranslateOptions,
    secrets: Mapping[str, str] | None = None,
    identity: NodeIdentity | None = None,
    tool_tokens: ToolTokens | None = None,
    endpoints: Endpoints | None = None,
) -> Snapshot:
    messages = gateway_resources(model, options, secrets, identity, tool_tokens, endpoints)
    resources = [Resource.build(resource_name(m), m) for m in messages]
    return Snapshot.build(model.version, resources)


def build_snapshots(
    model: PolicyModel,
    options: TranslateOptions | None = None,
    secrets: Mapping[str, str] | None = None,
    identities: Identities | None = None,
    endpoints: Endpoints | None = None,
) -> dict[str, Snapshot]:
    """Every node group's snapshot: the gateways' (with secrets), one per agent (without).

    Each group gets only its own certificate and key; `endpoints` (Consul instances) only
    reach the gateways."""
    opts = options or TranslateOptions()
    gw_identity = identities.gateway if identities else None
    tool_tokens = identities.tool_tokens if identities else None
    snapshots = {
        GATEWAY_GROUP: gateway_snapshot(model, opts, secrets, gw_identity, tool_tokens, endpoints)
    }
    trust_domain = model.mesh.trust_domain
    certificates = identities.intercept if identities else {}
    intercepted = tuple(
        sorted(
            (d.host, d.port)
            for d in model.destinations
            if d.tls == "originate" and d.intercept and d.host in certificates
        )
    )
    held = tuple(certificates[h] for h in sorted({h for h, _ in intercepted}))
    for agent in model.agents:
        ident = identities.agents.get(agent.agent) if identities else None
        resources = _sidecar(
            agent.agent,
            model.mesh.gateway_listen_port,
            opts,
            ident,
            trust_domain,
            intercepted if ident is not None else (),
            held if ident is not None else (),
        )
        snapshots[f"agent/{agent.agent}"] = Snapshot.build(model.version, resources, True)
    return snapshots


@functools.lru_cache(maxsize=100_000)
def _sidecar(
    agent: str,
    gateway_port: int,
    options: TranslateOptions,
    identity: NodeIdentity | None,
    trust_domain: str,
    intercepted: Intercepted = (),
    certificates: tuple[HostCertificate, ...] = (),
) -> tuple[Resource, ...]:
    """Memoised: a sidecar's resources change only with its agent, certificate and gateway
    (and the intercepted destinations and their certificates, the same for every agent).

    Each part is memoised on what it depends on, so a change to one part (the gateway's port,
    which every sidecar's cluster names) re-encodes that part once for the fleet, not once per
    agent, and every agent's snapshot holds the same cluster object. Same messages as
    `sidecar_resources`."""
    secrets = _secrets(identity, trust_domain) if identity is not None else ()
    base = (*secrets, _gateway_cluster(gateway_port, options, identity is not None))
    if not intercepted:
        return (*base, _routes(agent))
    return (
        *base,
        _intercept_routes(agent, intercepted),
        *_intercept_secrets(certificates),
        _intercept_cluster(),
        _intercept_listener(agent, tuple(c.host for c in certificates)),
    )


@functools.lru_cache(maxsize=100_000)
def _secrets(identity: NodeIdentity, trust_domain: str) -> tuple[Resource, ...]:
    messages = identity_secrets(identity, f"spiffe://{trust_domain}/gateway/")
    return tuple(Resource.build(resource_name(m), m) for m in messages)


@functools.lru_cache(maxsize=64)
def _gateway_cluster(gateway_port: int, options: TranslateOptions, tls: bool) -> Resource:
    return Resource.build(GATEWAY_CLUSTER, gateway_cluster(gateway_port, options, tls))


@functools.lru_cache(maxsize=100_000)
def _routes(agent: str) -> Resource:
    return Resource.build(route_name(agent), agent_routes(agent))


@functools.lru_cache(maxsize=100_000)
def _intercept_routes(agent: str, intercepted: Intercepted) -> Resource:
    return Resource.build(route_name(agent), agent_routes(agent, intercepted))


@functools.lru_cache(maxsize=64)
def _intercept_secrets(certificates: tuple[HostCertificate, ...]) -> tuple[Resource, ...]:
    """Shared by every agent's snapshot: encoded once per renewal, not once per agent."""
    return tuple(Resource.build(m.name, m) for m in intercept_secrets(certificates))


@functools.lru_cache(maxsize=1)
def _intercept_cluster() -> Resource:
    return Resource.build(INTERCEPT_CLUSTER, intercept_cluster())


@functools.lru_cache(maxsize=100_000)
def _intercept_listener(agent: str, hosts: tuple[str, ...]) -> Resource:
    return Resource.build(INTERCEPT_LISTENER, intercept_listener(agent, hosts))


def clear_translation_caches() -> None:
    """Forget every memoised translation (for cold-start measurements and tests)."""
    from meshgate.xds import allowlist, gateway, snapshot

    allowlist.rule_routes.cache_clear()
    gateway._destination_vhost.cache_clear()
    gateway._vhost_bytes.cache_clear()
    snapshot.clear_cache()
    for memo in (
        _sidecar,
        _secrets,
        _gateway_cluster,
        _routes,
        _intercept_routes,
        _intercept_secrets,
        _intercept_cluster,
        _intercept_listener,
    ):
        memo.cache_clear()

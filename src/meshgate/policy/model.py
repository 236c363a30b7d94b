"""The compiled policy: immutable, validated, in stable order, so translation is a pure function.

`xds/` reads only these types; it never sees YAML. Collections are tuples sorted by name so the same
policy always yields byte-identical Envoy resources on every replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TlsMode = Literal["originate", "passthrough", "none"]
SecretProviderKind = Literal["file", "env", "vault"]


@dataclass(frozen=True)
class RateLimit:
    requests: int
    per_seconds: int


@dataclass(frozen=True)
class HeaderMatch:
    """A request header the rule requires: exact value, or present when `value` is None."""

    name: str
    value: str | None = None


@dataclass(frozen=True)
class EgressRule:
    destination: str
    methods: tuple[str, ...] = ()  # empty: any method
    paths: tuple[str, ...] = ()  # exact "/a" or prefix "/a/*"; empty: any path
    headers: tuple[HeaderMatch, ...] = ()
    tools: tuple[str, ...] = ()  # MCP tool names; empty: any tool
    rate_limit: RateLimit | None = None


@dataclass(frozen=True)
class Credentials:
    header: str
    secret: str
    format: str = "{secret}"


@dataclass(frozen=True)
class ConsulService:
    """Instances of a Consul service (optionally one tag), healthy ones only by default."""

    service: str
    tag: str | None = None
    passing_only: bool = True


@dataclass(frozen=True)
class Destination:
    name: str
    host: str
    port: int
    tls: TlsMode = "originate"
    address: tuple[str, int] | None = None
    ca_file: str | None = None
    credentials: Credentials | None = None
    identity: Literal["none", "jwt"] = "none"
    labels: tuple[tuple[str, str], ...] = ()
    consul: ConsulService | None = None  # instead of `address`: endpoints from Consul


@dataclass(frozen=True)
class AgentPolicy:
    name: str
    agent: str
    rules: tuple[EgressRule, ...]


@dataclass(frozen=True)
class SecretsConfig:
    provider: SecretProviderKind = "file"
    path: str | None = None
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ConsulConfig:
    """The Consul HTTP API; `token_secret` names the ACL token in the secret provider."""

    address: str  # http(s)://host:port
    token_secret: str | None = None
    datacenter: str | None = None
    ca_file: str | None = None  # https only; relative to the policy root


@dataclass(frozen=True)
class Mesh:
    name: str = "default"
    trust_domain: str = "agents.local"
    gateway_listen_port: int = 15001
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    consul: ConsulConfig | None = None


@dataclass(frozen=True)
class PolicyModel:
    """A whole validated policy. `version` is the git commit, or a content hash for a directory."""

    mesh: Mesh
    destinations: tuple[Destination, ...]
    agents: tuple[AgentPolicy, ...]
    version: str

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)

    def agent(self, name: str) -> AgentPolicy | None:
        for a in self.agents:
            if a.agent == name:
                return a
        return None

    def spiffe_id(self, agent: str) -> str:
        return f"spiffe://{self.mesh.trust_domain}/agent/{agent}"

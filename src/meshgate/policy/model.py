"""The compiled policy: immutable, validated, in stable order, so translation is a pure function.

`xds/` reads only these types; it never sees YAML. Collections are tuples sorted by name so the same
policy always yields byte-identical Envoy resources on every replica.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from meshgate.delegation import names

TlsMode = Literal["originate", "passthrough", "none"]
SecretProviderKind = Literal["file", "env", "vault"]
FailureMode = Literal["open", "closed"]
RuleMode = Literal["enforce", "shadow"]  # shadow: evaluated on real traffic, never enforced
BudgetUnit = Literal["requests", "tokens", "input_tokens", "output_tokens", "cost_micro_usd"]
BudgetWindow = Literal["hour", "day", "month"]


@dataclass(frozen=True)
class RateLimit:
    """`scope`: one bucket per gateway replica (Envoy's local limiter) or one shared by every
    replica (the pacer's store); `on_store_failure` applies to global limits only."""

    requests: int
    per_seconds: int
    scope: Literal["replica", "global"] = "replica"
    on_store_failure: FailureMode = "open"


@dataclass(frozen=True)
class Concurrency:
    """At most `max` requests in flight per gateway replica; others wait up to `max_wait_ms`."""

    max: int
    max_wait_ms: int = 0


@dataclass(frozen=True)
class Budget:
    """What a counter may spend per calendar window (UTC). Cost is in micro-dollars."""

    name: str
    unit: BudgetUnit
    limit: int
    window: BudgetWindow
    on_store_failure: FailureMode = "closed"


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens of a model glob, as the exact decimal text."""

    model: str
    input: str
    output: str


@dataclass(frozen=True)
class Llm:
    """An LLM provider's API: the gateway reads model, max tokens and usage from its bodies."""

    api: Literal["openai", "anthropic"]
    prices: tuple[Price, ...] = ()


@dataclass(frozen=True)
class HeaderMatch:
    """A request header the rule requires: exact value, or present when `value` is None."""

    name: str
    value: str | None = None


@dataclass(frozen=True)
class ArgumentRule:
    """What one argument of a tool call must be. `const` and `enum` hold RFC 8785 canonical
    JSON text, so comparing a value is comparing its canonical form. String keywords (pattern,
    prefix, max_length) refuse a value that is not a string; number keywords one that is not a
    number."""

    name: str
    const: str | None = None
    enum: tuple[str, ...] = ()
    pattern: str | None = None  # whole-value match, the dialect of syntax.compile_argument_pattern
    prefix: str | None = None
    max_length: int | None = None  # in Unicode code points
    minimum: int | float | None = None
    maximum: int | float | None = None


@dataclass(frozen=True)
class ToolRule:
    """A tool entry with argument rules (`tools: [{name: ..., arguments: ...}]`).

    `required`: arguments that must be present; `additional_arguments`: whether arguments not
    in `arguments` are allowed (unchecked)."""

    name: str
    arguments: tuple[ArgumentRule, ...] = ()  # in policy order
    required: tuple[str, ...] = ()
    additional_arguments: bool = False


@dataclass(frozen=True)
class EgressRule:
    destination: str
    methods: tuple[str, ...] = ()  # empty: any method
    paths: tuple[str, ...] = ()  # exact "/a" or prefix "/a/*"; empty: any path
    headers: tuple[HeaderMatch, ...] = ()
    tools: tuple[str, ...] = ()  # MCP tool names, of every entry; empty: any tool
    rate_limit: RateLimit | None = None
    concurrency: Concurrency | None = None  # this agent on this rule
    models: tuple[str, ...] = ()  # model globs on an llm destination; empty: any model
    max_tokens: int | None = None
    budgets: tuple[Budget, ...] = ()  # counters of this agent and rule
    # the `tools` entries with argument rules (last, so positional construction is unchanged)
    tool_rules: tuple[ToolRule, ...] = ()
    mode: RuleMode = "enforce"
    # whose counters this rule's limits, budgets and caps draw from: (agent, rule index); None
    # for the rule's own. A sub-agent's rule draws from its parent's (delegation: never more)
    counters: tuple[str, int] | None = None

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce"

    def owner(self, agent: str, index: int) -> tuple[str, int]:
        """The (agent, index) that names this rule's counters."""
        return self.counters if self.counters is not None else (agent, index)


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
    llm: Llm | None = None
    concurrency: Concurrency | None = None  # all agents together, admitted fairly
    # read with tls: originate only: the agent's CONNECT host:port is opened by its sidecar
    # (HTTPS interception with the agent-trust CA) instead of refused; false keeps the refusal
    intercept: bool = True


@dataclass(frozen=True)
class GroupBudget:
    """A budget of an AgentGroup: one counter shared by all its agents."""

    group: str
    budget: Budget


@dataclass(frozen=True)
class Delegation:
    """An agent may hold up to `max_sub_agents` sub-agents at once, each for at most
    `max_ttl_seconds`, with a subset of its rights (delegation/rights.py)."""

    max_sub_agents: int
    max_ttl_seconds: int


@dataclass(frozen=True)
class AgentPolicy:
    name: str
    agent: str
    rules: tuple[EgressRule, ...]
    budgets: tuple[Budget, ...] = ()  # the agent's own counters, over all its requests
    group_budgets: tuple[GroupBudget, ...] = ()
    delegation: Delegation | None = None  # None: may not start sub-agents


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
    gateway_capacity: Concurrency | None = None  # per replica, all agents, fair between them
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    consul: ConsulConfig | None = None


@dataclass(frozen=True)
class PolicyModel:
    """A whole validated policy. `version` is the git commit, or a content hash for a directory."""

    mesh: Mesh
    destinations: tuple[Destination, ...]
    agents: tuple[AgentPolicy, ...]
    version: str
    # candidate versions of agents' policies (`mode: shadow` on an AgentPolicy): they replace
    # the agent's own in `shadow_model`, never in what is enforced
    shadow_agents: tuple[AgentPolicy, ...] = ()

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
        return agent_spiffe_id(self.mesh.trust_domain, agent)


def agent_spiffe_id(trust_domain: str, agent: str) -> str:
    """The SPIFFE ID of a policy agent or a sub-agent (`a.b` -> `agent/a/sub/b`), unvalidated:
    the one spelling the gateway's routes and the issued certificates share."""
    return f"spiffe://{trust_domain}/agent/{names.spiffe_path(agent)}"


def has_shadow(model: PolicyModel) -> bool:
    return bool(model.shadow_agents) or any(not r.enforced for a in model.agents for r in a.rules)


def shadow_model(model: PolicyModel) -> PolicyModel:
    """The policy as if every shadow rule and shadow AgentPolicy were enforced: what the
    would-be decisions of shadow mode are decided by. Rule indices are kept, so a rule's route
    names and counters mean the same rule in both models."""
    replaced = {a.agent: a for a in model.shadow_agents}
    agents = []
    for a in model.agents:
        candidate = replaced.get(a.agent, a)
        if all(r.enforced for r in candidate.rules):  # most agents: as they are
            agents.append(candidate)
            continue
        rules = tuple(
            r if r.enforced else dataclasses.replace(r, mode="enforce") for r in candidate.rules
        )
        agents.append(dataclasses.replace(candidate, rules=rules))
    return dataclasses.replace(model, agents=tuple(agents), shadow_agents=())


def shadowed_agents(model: PolicyModel) -> frozenset[str]:
    """Agents whose requests get a would-be decision."""
    return frozenset(a.agent for a in model.shadow_agents) | frozenset(
        a.agent for a in model.agents if any(not r.enforced for r in a.rules)
    )

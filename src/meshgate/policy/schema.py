"""pydantic models of the raw YAML documents: shape, types and single-field syntax only.

Strict mode (no "443" -> 443 coercion) and `extra="forbid"` so typos are errors, not silently
ignored rules. Cross-field and cross-document rules live in `compile.py`, where positions of both
sides are at hand.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag

from meshgate.policy import delegation, syntax

API_VERSION = "meshgate.dev/v1"

Name = Annotated[str, AfterValidator(syntax.name)]
Host = Annotated[str, AfterValidator(syntax.host)]
Port = Annotated[int, AfterValidator(syntax.port)]
NonEmpty = Annotated[str, AfterValidator(syntax.non_empty)]
Method = Annotated[str, AfterValidator(syntax.method)]
PathPattern = Annotated[str, AfterValidator(syntax.path)]
Tool = Annotated[str, AfterValidator(syntax.tool)]
HeaderName = Annotated[str, AfterValidator(syntax.header_name)]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Metadata(_Doc):
    name: Name
    labels: dict[str, str] | None = None


FailureMode = Literal["open", "closed"]
MaxWait = Annotated[str, AfterValidator(syntax.max_wait)]
Usd = Annotated[str | int | float, AfterValidator(syntax.usd)]
ModelGlob = Annotated[str, AfterValidator(syntax.model_glob)]


class RateLimitDoc(_Doc):
    requests: Annotated[int, AfterValidator(syntax.requests)]
    per: Annotated[str, AfterValidator(syntax.period)]
    scope: Literal["replica", "global"] = "replica"
    onStoreFailure: FailureMode = "open"


class ConcurrencyDoc(_Doc):
    max: Annotated[int, AfterValidator(syntax.concurrency)]
    maxWait: MaxWait = "0s"


class BudgetDoc(_Doc):
    """Exactly one measure (compile checks it): requests, tokens, inputTokens, outputTokens or
    cost (US dollars)."""

    name: Name
    window: Literal["hour", "day", "month"]
    requests: Annotated[int, AfterValidator(syntax.requests)] | None = None
    tokens: Annotated[int, AfterValidator(syntax.requests)] | None = None
    inputTokens: Annotated[int, AfterValidator(syntax.requests)] | None = None
    outputTokens: Annotated[int, AfterValidator(syntax.requests)] | None = None
    cost: Usd | None = None
    onStoreFailure: FailureMode = "closed"


class PriceDoc(_Doc):
    input: Usd
    output: Usd


class LlmDoc(_Doc):
    api: Literal["openai", "anthropic"]
    prices: dict[ModelGlob, PriceDoc] | None = None


class HeaderDoc(_Doc):
    name: HeaderName
    value: str | None = None


ArgumentName = Annotated[str, AfterValidator(syntax.argument_name)]
JsonNumber = Annotated[Any, AfterValidator(syntax.json_number)]


class ArgumentDoc(_Doc):
    """Constraints on one argument of a tool call: a small, documented subset of JSON Schema.
    `const` may be null, so whether it was given is read from `model_fields_set`."""

    const: Any = None
    enum: Annotated[list[Any], AfterValidator(syntax.non_empty_list("value"))] | None = None
    pattern: Annotated[str, AfterValidator(syntax.argument_pattern)] | None = None
    prefix: str | None = None
    maxLength: Annotated[int, AfterValidator(syntax.max_length)] | None = None
    minimum: JsonNumber | None = None
    maximum: JsonNumber | None = None


class ToolDoc(_Doc):
    """A tool entry with argument rules; a plain name in `tools` allows any arguments."""

    name: Tool
    arguments: dict[ArgumentName, ArgumentDoc] | None = None
    required: list[ArgumentName] | None = None  # default: every argument under `arguments`
    additionalArguments: bool = False  # arguments not listed are refused unless true


TOOL_NAME_TAG = "tool-name"
TOOL_OBJECT_TAG = "tool-object"


def _tool_entry_kind(v: Any) -> str:
    return TOOL_OBJECT_TAG if isinstance(v, dict) else TOOL_NAME_TAG


ToolEntry = Annotated[
    Annotated[Tool, Tag(TOOL_NAME_TAG)] | Annotated[ToolDoc, Tag(TOOL_OBJECT_TAG)],
    Discriminator(_tool_entry_kind),
]


class RuleDoc(_Doc):
    destination: Name
    methods: Annotated[list[Method], AfterValidator(syntax.non_empty_list("method"))] | None = None
    paths: Annotated[list[PathPattern], AfterValidator(syntax.non_empty_list("path"))] | None = None
    headers: Annotated[list[HeaderDoc], AfterValidator(syntax.non_empty_list("header"))] | None = (
        None
    )
    tools: Annotated[list[ToolEntry], AfterValidator(syntax.non_empty_list("tool"))] | None = None
    rateLimit: RateLimitDoc | None = None
    concurrency: ConcurrencyDoc | None = None
    models: Annotated[list[ModelGlob], AfterValidator(syntax.non_empty_list("model"))] | None = None
    maxTokens: Annotated[int, AfterValidator(syntax.token_count)] | None = None
    budgets: list[BudgetDoc] | None = None
    mode: Literal["enforce", "shadow"] | None = None


class GatewayDoc(_Doc):
    listenPort: Port = 15001
    capacity: ConcurrencyDoc | None = None  # per replica: waiting here is the autoscaling signal


class FileSecretsDoc(_Doc):
    provider: Literal["file"]
    path: NonEmpty


class EnvSecretsDoc(_Doc):
    provider: Literal["env"]


class VaultSecretsDoc(_Doc):
    """Vault settings beyond `address` are passed through as strings (mount, role, namespace...)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    provider: Literal["vault"]
    address: NonEmpty


SecretsDoc = Annotated[
    FileSecretsDoc | EnvSecretsDoc | VaultSecretsDoc, Field(discriminator="provider")
]


class ConsulMeshDoc(_Doc):
    """Where the Consul catalogue is; the ACL token is a secret *name*, never a value."""

    address: Annotated[str, AfterValidator(syntax.consul_address)]
    tokenSecret: Annotated[str, AfterValidator(syntax.secret_name)] | None = None
    datacenter: Annotated[str, AfterValidator(syntax.consul_name)] | None = None
    caFile: NonEmpty | None = None


class ConsulServiceDoc(_Doc):
    """A Destination's instances come from this Consul service instead of `address`."""

    service: Annotated[str, AfterValidator(syntax.consul_name)]
    tag: Annotated[str, AfterValidator(syntax.consul_tag)] | None = None
    passingOnly: bool = True


class MeshSpec(_Doc):
    trustDomain: Annotated[str, AfterValidator(syntax.dns_name)]
    egressGateway: GatewayDoc | None = None
    secrets: SecretsDoc | None = None
    consul: ConsulMeshDoc | None = None


class CredentialsDoc(_Doc):
    header: HeaderName
    secret: Annotated[str, AfterValidator(syntax.secret_name)]
    format: Annotated[str, AfterValidator(syntax.secret_format)] = "{secret}"


class DestinationSpec(_Doc):
    host: Host
    port: Port
    tls: Literal["originate", "passthrough", "none"] = "originate"
    address: Annotated[str, AfterValidator(syntax.address)] | None = None
    caFile: NonEmpty | None = None
    intercept: bool | None = None  # tls: originate only; default true
    identity: Literal["none", "jwt"] = "none"
    credentials: CredentialsDoc | None = None
    consul: ConsulServiceDoc | None = None
    llm: LlmDoc | None = None
    concurrency: ConcurrencyDoc | None = None  # all agents together, fair between them


class DelegationDoc(_Doc):
    """May this agent start sub-agents (a subset of its rights), how many, for how long."""

    maxSubAgents: Annotated[int, AfterValidator(delegation.sub_agent_count)]
    maxTtl: Annotated[str, AfterValidator(delegation.max_ttl)]


class AgentPolicySpec(_Doc):
    agent: Name
    # shadow: a candidate version of the agent's policy, evaluated beside the enforced one
    mode: Literal["enforce", "shadow"] | None = None
    budgets: list[BudgetDoc] | None = None
    egress: list[RuleDoc] | None = None
    delegation: DelegationDoc | None = None  # absent: this agent cannot delegate


class AgentGroupSpec(_Doc):
    agents: Annotated[list[Name], AfterValidator(syntax.non_empty_list("agent"))]
    mode: Literal["enforce", "shadow"] | None = None  # shadow: every rule of the group
    budgets: list[BudgetDoc] | None = None  # one counter shared by the group's agents
    egress: list[RuleDoc] | None = None


class DefaultPolicySpec(_Doc):
    egress: list[RuleDoc] | None = None


class _Envelope(_Doc):
    apiVersion: Literal["meshgate.dev/v1"]
    metadata: Metadata


class MeshDoc(_Envelope):
    kind: Literal["Mesh"]
    spec: MeshSpec


class DestinationDoc(_Envelope):
    kind: Literal["Destination"]
    spec: DestinationSpec


class AgentPolicyDoc(_Envelope):
    kind: Literal["AgentPolicy"]
    spec: AgentPolicySpec


class AgentGroupDoc(_Envelope):
    kind: Literal["AgentGroup"]
    spec: AgentGroupSpec


class DefaultPolicyDoc(_Envelope):
    kind: Literal["DefaultPolicy"]
    spec: DefaultPolicySpec


AnyDoc = MeshDoc | DestinationDoc | AgentPolicyDoc | AgentGroupDoc | DefaultPolicyDoc

DOC_MODELS: dict[str, type[AnyDoc]] = {
    "Mesh": MeshDoc,
    "Destination": DestinationDoc,
    "AgentPolicy": AgentPolicyDoc,
    "AgentGroup": AgentGroupDoc,
    "DefaultPolicy": DefaultPolicyDoc,
}
KINDS = tuple(sorted(DOC_MODELS))


def field_names(model: type[BaseModel]) -> list[str]:
    """The YAML keys a model accepts, for "did you mean" hints."""
    return [f.alias or n for n, f in model.model_fields.items()]


def vault_options(doc: VaultSecretsDoc) -> dict[str, Any]:
    """Every vault setting except the provider tag, unvalidated (compile checks they're scalars)."""
    extra = dict(doc.model_extra or {})
    extra["address"] = doc.address
    return extra

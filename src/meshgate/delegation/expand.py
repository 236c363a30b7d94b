"""Policy + sub-agents -> the model translation sees. Pure.

Each sub-agent becomes an `AgentPolicy` named `parent.child` whose rules are re-derived from
its parent's *current* rules on every build, so a sub-agent whose parent lost (or changed) a rule
it kept is revoked, never left with a right the parent no longer has. Agents that may delegate
get one more rule: to the delegation service (`service.py`), reached through the gateway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from meshgate.delegation import names
from meshgate.delegation.rights import DelegationError, RuleGrant, fingerprint, sub_rules
from meshgate.policy.model import (
    AgentPolicy,
    Credentials,
    Delegation,
    Destination,
    EgressRule,
    GroupBudget,
    PolicyModel,
)

# The delegation service as agents see it: `http://meshgate.internal/v1/sub-agents`. Its name
# has a dot, which policy names cannot, so it never collides with a policy destination.
SERVICE_DESTINATION = "meshgate.delegation"
SERVICE_HOST = "meshgate.internal"
SERVICE_PATHS = ("/v1/sub-agents", "/v1/sub-agents/*")
KEY_HEADER = "x-meshgate-delegation-key"  # set by the gateway's injector: "a gateway sent this"
KEY_SECRET = "meshgate.delegation-key"  # the secrets-input name of its value


@dataclass(frozen=True)
class SubAgent:
    """A sub-agent as the control plane keeps it (persisted by `registry.py`)."""

    name: str  # parent.child
    grants: tuple[RuleGrant, ...]
    fingerprints: tuple[str, ...]  # of the parent rules kept, when granted
    created_at: int  # unix seconds
    expires_at: int
    delegation: Delegation | None = None
    token_id: str = ""

    @property
    def parent(self) -> str:
        parent = names.parent_of(self.name)
        assert parent is not None
        return parent


@dataclass(frozen=True)
class Service:
    """Where gateways reach the control plane's delegation endpoint (plain HTTP: loopback or a
    private network between gateway and control plane)."""

    address: tuple[str, int]


@dataclass(frozen=True)
class Expansion:
    model: PolicyModel
    active: tuple[SubAgent, ...]
    revoked: tuple[tuple[SubAgent, str], ...]  # and why


def expand(
    model: PolicyModel, subs: Sequence[SubAgent], service: Service | None = None
) -> Expansion:
    """`model` with the sub-agents that still hold (parents first) and the service rules."""
    own = [shared_budgets(a) if a.delegation else a for a in model.agents]
    agents: dict[str, AgentPolicy] = {a.agent: a for a in own}
    expiry: dict[str, int] = {}
    children: dict[str, int] = {}
    active: list[SubAgent] = []
    revoked: list[tuple[SubAgent, str]] = []
    added: list[AgentPolicy] = []
    for sub in sorted(subs, key=lambda s: (names.depth(s.name), s.created_at, s.name)):
        try:
            policy = derive(sub, agents, expiry, children)
        except DelegationError as exc:
            revoked.append((sub, str(exc)))
            continue
        agents[sub.name] = policy
        expiry[sub.name] = sub.expires_at
        children[sub.parent] = children.get(sub.parent, 0) + 1
        active.append(sub)
        added.append(policy)
    everyone = [*own, *added]
    destinations = model.destinations
    if service is not None and not any(d.host == SERVICE_HOST for d in destinations):
        destinations = tuple(sorted((*destinations, service_destination(service)), key=_name))
        everyone = [_with_service_rule(a) if a.delegation else a for a in everyone]
    out = dataclasses.replace(
        model, agents=tuple(sorted(everyone, key=lambda a: a.agent)), destinations=destinations
    )
    return Expansion(out, tuple(active), tuple(revoked))


def derive(
    sub: SubAgent,
    agents: dict[str, AgentPolicy],
    expiry: dict[str, int],
    children: dict[str, int],
) -> AgentPolicy:
    """The sub-agent's policy from its parent's, or DelegationError saying why it lapsed."""
    parent = agents.get(sub.parent)
    if parent is None:
        raise DelegationError(f"its parent {sub.parent!r} no longer exists")
    right = parent.delegation
    if right is None:
        raise DelegationError(f"its parent {sub.parent!r} may no longer delegate")
    if children.get(sub.parent, 0) >= right.max_sub_agents:
        raise DelegationError(f"its parent {sub.parent!r} is over maxSubAgents")
    if sub.expires_at - sub.created_at > right.max_ttl_seconds:
        raise DelegationError(f"it outlives its parent's maxTtl ({right.max_ttl_seconds}s)")
    if sub.parent in expiry and sub.expires_at > expiry[sub.parent]:
        raise DelegationError(f"it outlives its parent {sub.parent!r}")
    if sub.delegation is not None and (
        sub.delegation.max_sub_agents > right.max_sub_agents
        or sub.delegation.max_ttl_seconds > right.max_ttl_seconds
    ):
        raise DelegationError(f"it may delegate more than its parent {sub.parent!r}")
    for grant, kept in zip(sub.grants, sub.fingerprints, strict=True):
        rules = parent.rules
        if not 0 <= grant.rule < len(rules) or fingerprint(rules[grant.rule]) != kept:
            raise DelegationError(f"its parent's rule {grant.rule} changed or is gone")
    rules, _ = sub_rules(parent, sub.grants)
    return AgentPolicy(
        name=parent.name,
        agent=sub.name,
        rules=rules,
        # the parent's budgets are group budgets (`shared_budgets`): one counter, charged by
        # the parent and everything below it
        budgets=(),
        group_budgets=parent.group_budgets,
        delegation=sub.delegation,
    )


def budget_group(agent: str) -> str:
    """The group an agent's own budgets become once it may delegate (a name no AgentGroup can
    have), so that its sub-agents' spend counts against them too."""
    return f"delegation:{agent}"


def shared_budgets(agent: AgentPolicy) -> AgentPolicy:
    """An agent that may delegate: its own budgets as one counter it shares with its sub-agents
    (`group/delegation:<agent>/<name>` instead of `agent/<agent>/<name>`; same limits, same
    requests counted). Its rules' budgets and rate limits are not shared (docs/policy.md)."""
    if not agent.budgets:
        return agent
    group = budget_group(agent.agent)
    return dataclasses.replace(
        agent,
        budgets=(),
        group_budgets=(*agent.group_budgets, *(GroupBudget(group, b) for b in agent.budgets)),
    )


def service_destination(service: Service) -> Destination:
    return Destination(
        name=SERVICE_DESTINATION,
        host=SERVICE_HOST,
        port=80,
        tls="none",
        address=service.address,
        credentials=Credentials(header=KEY_HEADER, secret=KEY_SECRET),
    )


SERVICE_RULE = EgressRule(
    destination=SERVICE_DESTINATION, methods=("GET", "POST", "DELETE"), paths=SERVICE_PATHS
)


def _with_service_rule(agent: AgentPolicy) -> AgentPolicy:
    """Last, so it never shifts the numbers sub-agent requests name the parent's rules by."""
    return dataclasses.replace(agent, rules=(*agent.rules, SERVICE_RULE))


def _name(d: Destination) -> str:
    return d.name

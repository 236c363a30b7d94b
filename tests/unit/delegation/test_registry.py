"""Sub-agents as a runtime input: created against the served model, kept across restarts,
dropped for good when they expire or their parent's policy no longer allows them."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from meshgate.delegation.expand import SERVICE_DESTINATION, Service, expand
from meshgate.delegation.registry import DelegationRegistry, Request
from meshgate.delegation.rights import DelegationError, RuleGrant
from meshgate.policy.model import (
    AgentPolicy,
    Budget,
    Concurrency,
    Delegation,
    Destination,
    EgressRule,
    Llm,
    Mesh,
    PolicyModel,
    RateLimit,
)
from meshgate.xds.gateway import egress_routes
from meshgate.xds.pacing import global_limit, pace_spec


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


DEFAULT = Delegation(2, 600)


def model(delegation: Delegation | None = DEFAULT, **rules: EgressRule) -> PolicyModel:
    sup_rules = tuple(rules.values()) or (
        EgressRule("alpha"),
        EgressRule("beta", methods=("GET",)),
    )
    return PolicyModel(
        Mesh(trust_domain="agents.test"),
        (Destination("alpha", "alpha.internal", 80), Destination("beta", "beta.internal", 80)),
        (
            AgentPolicy("coder", "coder", (EgressRule("beta"),)),
            AgentPolicy("sup", "sup", sup_rules, delegation=delegation),
        ),
        "v1",
    )


def ask(name: str = "web-1", ttl: int = 300, *grants: RuleGrant) -> Request:
    return Request(name, ttl, grants or (RuleGrant(0, methods=("GET",)),))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_created_sub_agent_is_served_with_narrowed_rules(tmp_path: Path, clock: Clock) -> None:
    reg = DelegationRegistry(tmp_path, clock)
    m = model()
    sub = reg.create("sup", ask(), m)
    assert sub.name == "sup.web-1" and sub.expires_at == clock.now + 300
    served = expand(m, reg.current(m), Service(("127.0.0.1", 9))).model
    policy = served.agent("sup.web-1")
    assert policy is not None
    # no service rule (no right to delegate); the parent's counters for its rule 0
    assert policy.rules == (EgressRule("alpha", methods=("GET",), counters=("sup", 0)),)
    sup = served.agent("sup")
    assert sup is not None and sup.rules[-1].destination == SERVICE_DESTINATION
    coder = served.agent("coder")
    assert coder is not None and all(r.destination != SERVICE_DESTINATION for r in coder.rules)
    assert served.spiffe_id("sup.web-1") == "spiffe://agents.test/agent/sup/sub/web-1"


def test_refusals(tmp_path: Path, clock: Clock) -> None:
    reg = DelegationRegistry(tmp_path, clock)
    m = model()
    with pytest.raises(DelegationError, match="'coder' may not delegate"):
        reg.create("coder", ask(), m)
    with pytest.raises(DelegationError, match="not an agent of the served policy"):
        reg.create("ghost", ask(), m)
    with pytest.raises(DelegationError, match="ttl: at most 600s"):
        reg.create("sup", ask(ttl=601), m)
    with pytest.raises(DelegationError, match="a DNS label"):
        reg.create("sup", ask(name="a.b"), m)
    with pytest.raises(DelegationError, match="method 'POST' is not allowed"):
        reg.create("sup", ask("x", 60, RuleGrant(1, methods=("POST",))), m)
    reg.create("sup", ask("one"), m)
    with pytest.raises(DelegationError, match="exists already"):
        reg.create("sup", ask("one"), m)
    reg.create("sup", ask("two"), m)
    with pytest.raises(DelegationError, match="maxSubAgents is 2"):
        reg.create("sup", ask("three"), m)
    assert reg.all() and not (tmp_path / "delegation" / "sub-agents.json").stat().st_mode & (
        stat.S_IRWXG | stat.S_IRWXO
    )


def test_kept_across_restarts_until_they_expire(tmp_path: Path, clock: Clock) -> None:
    m = model()
    DelegationRegistry(tmp_path, clock).create("sup", ask(ttl=60), m)
    again = DelegationRegistry(tmp_path, clock)
    assert [s.name for s in again.current(m)] == ["sup.web-1"]
    clock.now += 61
    again.refresh()  # the refresh thread reads every second (the clock jumped)
    assert again.current(m) == ()
    again.refresh()  # the refresh thread deletes what `current` dropped
    assert DelegationRegistry(tmp_path, clock).all() == []  # dropped for good


def test_revoked_when_the_parent_loses_the_right(tmp_path: Path, clock: Clock) -> None:
    m = model()
    reg = DelegationRegistry(tmp_path, clock)
    reg.create("sup", ask("keeps-beta", 60, RuleGrant(1)), m)
    reg.create("sup", ask("keeps-alpha", 60, RuleGrant(0)), m)
    # the parent's beta rule narrows: a sub-agent that kept it must not keep the old one
    narrower = model(a=EgressRule("alpha"), b=EgressRule("beta", methods=("GET",), paths=("/x",)))
    assert [s.name for s in reg.current(narrower)] == ["sup.keeps-alpha"]
    assert [s.name for s in reg.all()] == ["sup.keeps-alpha"]
    # and once the parent may no longer delegate, none is left
    assert reg.current(model(delegation=None)) == ()


def test_sub_sub_agents_stay_inside_their_parent(tmp_path: Path, clock: Clock) -> None:
    m = model(delegation=Delegation(2, 600))
    reg = DelegationRegistry(tmp_path, clock)
    with pytest.raises(DelegationError, match="the parent's own limits"):
        reg.create("sup", dataclasses.replace(ask(), delegation=Delegation(3, 60)), m)
    reg.create("sup", dataclasses.replace(ask(ttl=120), delegation=Delegation(1, 60)), m)
    served = expand(m, reg.current(m)).model
    with pytest.raises(DelegationError, match="ttl: at most 60s"):
        reg.create("sup.web-1", ask("deep", 61), served)
    deep = reg.create("sup.web-1", ask("deep", 60), served)
    assert deep.name == "sup.web-1.deep"
    with pytest.raises(DelegationError, match="maxSubAgents is 1"):
        reg.create("sup.web-1", ask("deeper", 60), served)
    assert [s.name for s in reg.current(m)] == ["sup.web-1", "sup.web-1.deep"]
    # deleting the middle one removes what it delegated too
    assert [s.name for s in reg.delete("sup", "web-1")] == ["sup.web-1", "sup.web-1.deep"]
    assert reg.current(m) == ()


def test_a_sub_sub_agent_never_outlives_its_parent(tmp_path: Path, clock: Clock) -> None:
    m = model(delegation=Delegation(2, 600))
    reg = DelegationRegistry(tmp_path, clock)
    reg.create("sup", dataclasses.replace(ask(ttl=30), delegation=Delegation(1, 600)), m)
    served = expand(m, reg.current(m)).model
    deep = reg.create("sup.web-1", ask("deep", 600), served)
    assert deep.expires_at == clock.now + 30


def test_sub_agents_spend_from_their_parents_own_budgets(tmp_path: Path, clock: Clock) -> None:
    """The parent's agent budgets become one counter the parent and its sub-agents share: the
    pacer's spec of a sub-agent's request names the same budget id as the parent's."""
    daily = Budget("daily", "cost_micro_usd", 5_000_000, "day")
    m = model()
    sup = m.agent("sup")
    assert sup is not None
    m = dataclasses.replace(
        m,
        agents=tuple(dataclasses.replace(a, budgets=(daily,)) if a is sup else a for a in m.agents),
        destinations=tuple(dataclasses.replace(d, llm=Llm("openai")) for d in m.destinations),
    )
    reg = DelegationRegistry(tmp_path, clock)
    served = expand(m, (), Service(("127.0.0.1", 9))).model
    reg.create("sup", ask(), served)
    served = expand(m, reg.current(m), Service(("127.0.0.1", 9))).model
    alpha = served.destination("alpha")

    def budget_ids(agent: str) -> set[str]:
        policy = served.agent(agent)
        assert policy is not None
        spec = pace_spec(served.mesh, policy, 0, policy.rules[0], alpha)
        assert spec is not None
        return {b.id for b in spec.budgets}

    assert budget_ids("sup") == {"group/delegation:sup/daily"}
    assert budget_ids("sup.web-1") == {"group/delegation:sup/daily"}
    # an agent that may not delegate keeps its counter where it was
    plain = expand(dataclasses.replace(m, agents=tuple(
        dataclasses.replace(a, delegation=None) for a in m.agents)), ()).model  # fmt: skip
    assert plain.agent("sup") == dataclasses.replace(m.agent("sup"), delegation=None)  # type: ignore[arg-type]


def test_an_unreadable_file_drops_the_sub_agents_not_the_control_plane(
    tmp_path: Path, clock: Clock
) -> None:
    (tmp_path / "delegation").mkdir()
    (tmp_path / "delegation" / "sub-agents.json").write_text('[{"name": 3}]')
    reg = DelegationRegistry(tmp_path, clock)
    assert reg.all() == []
    assert (tmp_path / "delegation" / "sub-agents.json.unreadable").exists()


def test_a_sub_agents_rule_draws_from_its_parents_counters(tmp_path: Path, clock: Clock) -> None:
    """Never more, in money and pace too: the rule's budget, global and replica limits and cap
    are the parent's counters, whatever sub-agent sends the request."""
    limited = EgressRule(
        "alpha",
        rate_limit=RateLimit(5, 60),
        concurrency=Concurrency(2, 1000),
        budgets=(Budget("daily", "requests", 10, "day"),),
    )
    shared = EgressRule("beta", rate_limit=RateLimit(7, 60, scope="global"))
    m = model(a=limited, b=shared)
    reg = DelegationRegistry(tmp_path, clock)
    for name in ("web-1", "web-2"):
        reg.create("sup", Request(name, 300, (RuleGrant(0), RuleGrant(1))), m)
    served = expand(m, reg.current(m)).model
    for agent in ("sup", "sup.web-1", "sup.web-2"):
        policy = served.agent(agent)
        assert policy is not None
        alpha, beta = policy.rules[0], policy.rules[1]
        dest_a, dest_b = served.destinations[0], served.destinations[1]
        pace = pace_spec(served.mesh, policy, 0, alpha, dest_a)
        assert pace is not None
        assert [b.id for b in pace.budgets] == ["rule/sup/0/daily"]
        assert [c.key for c in pace.concurrency] == ["rule/sup/alpha/0"]
        assert global_limit(agent, dest_b, 1, beta).key == "sup/beta/1"
    table = egress_routes(served, {})
    alpha_vh = next(v for v in table.virtual_hosts if v.name.startswith("alpha"))
    keys = {
        r.route.rate_limits[0].actions[0].generic_key.descriptor_value
        for r in alpha_vh.routes
        if r.name.startswith("allow/")
    }
    assert keys == {"sup/alpha/0"}  # one replica bucket for the three agents


def test_an_orphan_is_dropped_for_good_whatever_the_policy_age(
    tmp_path: Path, clock: Clock
) -> None:
    """A child whose parent sub-agent was deleted (a create that raced the delete) is dropped
    at once, even if created after this replica began serving its policy, and the parent
    re-created with the same grants does not bring it back nor count it."""
    m = model()
    reg = DelegationRegistry(tmp_path, clock)
    reg.current(m)  # serving m since now
    wide = dataclasses.replace(ask("w", 120), delegation=Delegation(1, 60))
    reg.create("sup", wide, m)
    clock.now += 1
    orphan = reg.create("sup.w", ask("x", 60), expand(m, reg.current(m)).model)
    reg.store.remove_tree("sup.w")
    reg.store.add("sup.w", lambda children, own: orphan)  # what the race left behind
    clock.now += 1
    reg.refresh()
    assert reg.current(m) == ()
    reg.refresh()
    reg.create("sup", wide, m)  # the same grants again
    served = expand(m, reg.current(m)).model
    assert [s.name for s in reg.current(m)] == ["sup.w"]
    assert [s.name for s in reg.store.load()] == ["sup.w"]
    assert reg.create("sup.w", ask("y", 60), served).name == "sup.w.y"  # its maxSubAgents is 1

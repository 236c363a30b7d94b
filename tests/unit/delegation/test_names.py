"""Sub-agent names and identities, and the audit chain taken from them."""

from __future__ import annotations

import pytest

from meshgate.audit.ingest import agent_name, delegation_chain, node_chain
from meshgate.delegation import names
from meshgate.identity.ca import IdentityError
from meshgate.identity.certs import parse_spiffe_id, spiffe_id
from meshgate.xds.nodes import parse_node_id


def test_names_and_spiffe_ids_name_the_whole_chain() -> None:
    assert names.chain("sup.web-1.deep") == ("sup", "web-1", "deep")
    assert names.parent_of("sup.web-1") == "sup" and names.parent_of("sup") is None
    sid = spiffe_id("agents.test", "agent", "sup.web-1")
    assert sid == "spiffe://agents.test/agent/sup/sub/web-1"
    assert parse_spiffe_id(sid) == ("agents.test", "agent", "sup.web-1")
    assert parse_spiffe_id("spiffe://agents.test/agent/sup") == ("agents.test", "agent", "sup")
    for bad in (
        "spiffe://agents.test/agent/sup/web-1",  # not `sub`
        "spiffe://agents.test/agent/sup/sub/",
        "spiffe://agents.test/agent/sup.web-1",  # a dotted name is never a path segment
        "spiffe://agents.test/gateway/g/sub/x",
        "spiffe://agents.test/agent/a/sub/b/sub/c/sub/d/sub/e",  # deeper than MAX_DEPTH
    ):
        with pytest.raises(IdentityError):
            parse_spiffe_id(bad)


def test_node_ids_of_sub_agents() -> None:
    role = parse_node_id("agent/sup.web-1/local")
    assert (role.name, role.group) == ("sup.web-1", "agent/sup.web-1")
    with pytest.raises(ValueError):
        parse_node_id("agent/sup..x/local")


def test_audit_chain_comes_from_the_verified_spiffe_id() -> None:
    sid = "spiffe://agents.test/agent/sup/sub/web-1/sub/deep"
    assert delegation_chain(sid) == "sup>web-1>deep"
    assert agent_name(sid) == "sup.web-1.deep"
    assert delegation_chain("spiffe://agents.test/agent/sup") == ""
    assert delegation_chain("") == ""  # no certificate (plaintext): no chain


def test_a_sub_agents_sidecar_records_carry_the_chain_of_its_node() -> None:
    assert node_chain("agent/sup.web-1/local") == "sup>web-1"
    assert node_chain("agent/sup/local") == ""
    assert node_chain("gateway/g1") == ""

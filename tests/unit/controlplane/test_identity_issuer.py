"""Certificates per node group: each key reaches only its own group; renewal at half-life."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import jwt
from builders import model

from meshgate.controlplane.identity import IdentityIssuer
from meshgate.policy.model import AgentPolicy, Destination, EgressRule, PolicyModel
from meshgate.xds import types
from meshgate.xds.build import build_snapshots


def test_each_private_key_only_in_its_own_groups_snapshot(tmp_path: Path) -> None:
    m = model("v1")
    m = type(m)(
        m.mesh,
        m.destinations,
        (*m.agents, AgentPolicy("coder", "coder", (EgressRule("beta"),))),
        "v1",
    )
    issuer = IdentityIssuer(tmp_path)
    ids = issuer.identities(m)
    snaps = build_snapshots(m, identities=ids)
    keys = {"gateway": ids.gateway.key_pem} | {
        f"agent/{a}": ident.key_pem for a, ident in ids.agents.items()
    }
    assert set(keys) == set(snaps) == {"gateway", "agent/researcher", "agent/coder"}
    for group, snap in snaps.items():
        blob = b"".join(r.any_bytes for t in snap.resources.values() for r in t.values())
        for owner, key in keys.items():
            assert (key in blob) == (owner == group), (owner, group)
    assert ids.agents["coder"].spiffe_id == "spiffe://agents.local/agent/coder"


def test_same_certificate_until_half_life_then_a_new_one(tmp_path: Path) -> None:
    m = model("v1")
    steady = IdentityIssuer(tmp_path / "a")
    assert steady.identities(m) == steady.identities(m)  # no re-issue while valid
    # 61 s certificates are backdated 60 s for clock skew: half-life comes ~0.5 s after issue
    quick = IdentityIssuer(tmp_path / "b", dt.timedelta(seconds=61))
    first = quick.identities(m).agents["researcher"]
    time.sleep(1.0)
    second = quick.identities(m).agents["researcher"]
    assert first.chain_pem != second.chain_pem
    assert first.trust_bundle_pem == second.trust_bundle_pem


def _jwt_model() -> PolicyModel:
    dests = (
        Destination("billing", "billing.internal", 80, tls="none", identity="jwt"),
        Destination("opaque", "opaque.internal", 443, tls="passthrough", identity="jwt"),
        Destination("plain", "plain.internal", 80, tls="none"),
    )
    rules = tuple(EgressRule(d.name) for d in dests)
    agents = (AgentPolicy("researcher", "researcher", rules), AgentPolicy("coder", "coder", ()))
    return model("v1", dests, agents=agents)


def test_tool_tokens_per_granted_pair_renewed_at_half_life_as_sds_only(tmp_path: Path) -> None:
    m = _jwt_model()
    issuer = IdentityIssuer(tmp_path, tool_token_ttl=dt.timedelta(seconds=2))
    first = issuer.identities(m)
    # only granted, HTTP-visible `identity: jwt` destinations: not passthrough, not plain
    assert set(first.tool_tokens) == {("researcher", "billing")}
    claims = jwt.decode(
        first.tool_tokens[("researcher", "billing")],
        jwt.PyJWK.from_dict(issuer.tool_signer.jwks()["keys"][0]).key,
        algorithms=["ES256"],
        audience="billing",
    )
    assert claims["sub"] == "spiffe://agents.local/agent/researcher"
    assert claims["iss"] == "spiffe://agents.local"
    assert issuer.identities(m).tool_tokens == first.tool_tokens  # not re-minted while fresh
    time.sleep(1.1)
    second = issuer.identities(m)
    assert second.tool_tokens != first.tool_tokens

    before = build_snapshots(m, identities=first)["gateway"]
    after = build_snapshots(m, identities=second)["gateway"]
    changed = {t for t in before.resources if before.version(t) != after.version(t)}
    assert changed == {types.SECRET}


def test_tool_signing_key_survives_restart_and_is_private(tmp_path: Path) -> None:
    a = IdentityIssuer(tmp_path)
    b = IdentityIssuer(tmp_path)
    assert a.tool_signer.jwks() == b.tool_signer.jwks()
    assert "d" not in a.tool_signer.jwks()["keys"][0]  # the private scalar is never published
    assert (a.tool_signer.path.stat().st_mode & 0o777) == 0o600

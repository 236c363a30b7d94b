"""Certificates per node group: each key reaches only its own group; renewal at half-life."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from builders import model

from meshgate.controlplane.identity import IdentityIssuer
from meshgate.policy.model import AgentPolicy, EgressRule
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

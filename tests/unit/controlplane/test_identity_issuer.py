"""Certificates per node group: each key reaches only its own group; renewal spread over a
window of the lifetime, a bounded number per pass; no lock held across the authority's I/O."""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest.mock import patch

import jwt
from builders import model

from meshgate.controlplane.identity import (
    BuiltinAuthority,
    IdentityIssuer,
    renewal_fraction,
    renewal_time,
)
from meshgate.identity.ca import CertificateAuthority
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


def test_same_certificate_until_its_renewal_point_then_a_new_one(tmp_path: Path) -> None:
    m = model("v1")
    steady = IdentityIssuer(tmp_path / "a")
    assert steady.identities(m) == steady.identities(m)  # no re-issue while valid
    # 61 s certificates are backdated 60 s for clock skew: half-life comes ~0.5 s after issue
    quick = IdentityIssuer(tmp_path / "b", dt.timedelta(seconds=61), renew_window=(0.5, 0.5))
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


def _agents(n: int) -> PolicyModel:
    base = model("v1")
    agents = tuple(AgentPolicy(f"a{i}", f"a{i}", (EgressRule("alpha"),)) for i in range(n))
    return type(base)(base.mesh, base.destinations, agents, "v1")


def test_renewal_points_spread_over_the_window_and_stable_per_certificate() -> None:
    points = [renewal_fraction(f"spiffe://td/agent/a{i}", 1000 + i) for i in range(10_000)]
    assert all(0.5 <= p < 0.75 for p in points)
    # spread evenly: every tenth of the window holds about a tenth of the groups
    buckets = [0] * 10
    for p in points:
        buckets[int((p - 0.5) / 0.025)] += 1
    assert all(800 < b < 1200 for b in buckets), buckets
    # the same certificate always renews at the same point; a new certificate re-draws
    assert renewal_fraction("spiffe://td/agent/a1", 7) == renewal_fraction(
        "spiffe://td/agent/a1", 7
    )
    assert renewal_fraction("spiffe://td/agent/a1", 7) != renewal_fraction(
        "spiffe://td/agent/a1", 8
    )
    assert renewal_fraction("spiffe://td/agent/a1", 7, (0.6, 0.6)) == 0.6


def test_issued_certificates_renew_inside_the_window(tmp_path: Path) -> None:
    issuer = IdentityIssuer(tmp_path)
    issuer.identities(_agents(20))
    for i in range(20):
        cert = issuer.issued(f"spiffe://agents.local/agent/a{i}")
        assert cert is not None
        life = cert.not_after - cert.not_before
        assert cert.not_before + life / 2 <= renewal_time(cert) < cert.not_before + life * 3 / 4


def test_one_pass_renews_a_bounded_number_most_overdue_first(tmp_path: Path) -> None:
    m = _agents(30)
    issuer = IdentityIssuer(tmp_path, renewals_per_pass=8)
    issuer.identities(m)  # every group is new: all issued in one pass, whatever the budget
    serials = {s: issuer.issued(s).serial for s in _spiffes(30)}  # type: ignore[union-attr]
    # 40 minutes on, 41 of each certificate's 61 (1 h plus 60 s backdating) have passed: 67 %,
    # so about two thirds of the groups are due and nothing is yet past 90 %
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=40)
    with patch("meshgate.controlplane.identity.now_utc", return_value=later):
        due = [s for s in _spiffes(30) if renewal_time(issuer.issued(s)) <= later]  # type: ignore[arg-type]
        assert len(due) > 8
        renewed: list[str] = []
        for _ in range(10):
            issuer.identities(m)
            now = {s for s in _spiffes(30) if issuer.issued(s).serial != serials[s]}  # type: ignore[union-attr]
            assert len(now) - len(renewed) <= 8  # never more than the budget in one pass
            renewed = sorted(now)
        assert renewed == sorted(due)  # all due ones, and only them, within a few passes


def _spiffes(n: int) -> list[str]:
    return [f"spiffe://agents.local/agent/a{i}" for i in range(n)]


def test_missing_or_nearly_expired_certificates_ignore_the_budget(tmp_path: Path) -> None:
    issuer = IdentityIssuer(tmp_path, renewals_per_pass=1)
    issuer.identities(_agents(5))
    serials = {s: issuer.issued(s).serial for s in _spiffes(5)}  # type: ignore[union-attr]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=55)  # past 90 % of 61 minutes
    with patch("meshgate.controlplane.identity.now_utc", return_value=later):
        issuer.identities(_agents(7))
    assert all(issuer.issued(s).serial != serials[s] for s in _spiffes(5))  # type: ignore[union-attr]
    assert all(issuer.issued(s) is not None for s in _spiffes(7))


class _SlowAuthority:
    """The built-in CA behind a slow network: load and rotate take `delay` seconds."""

    def __init__(self, state_dir: Path, delay: float) -> None:
        self.inner = BuiltinAuthority(state_dir)
        self.description = "slow"
        self.delay = delay
        self.calls = 0

    def load(self, trust_domain: str) -> CertificateAuthority:
        self.calls += 1
        time.sleep(self.delay)
        return self.inner.load(trust_domain)

    def refresh(self, ca: CertificateAuthority) -> CertificateAuthority | None:
        return None

    def rotate(self, ca: CertificateAuthority) -> CertificateAuthority:
        self.calls += 1
        time.sleep(self.delay)
        return self.inner.rotate(ca)


def test_no_reader_waits_while_the_authority_is_slow(tmp_path: Path) -> None:
    source = _SlowAuthority(tmp_path, 0.0)
    issuer = IdentityIssuer(tmp_path, source=source)
    m = model("v1")
    first = issuer.identities(m)
    before = issuer.authority()
    source.delay = 2.0
    with ThreadPoolExecutor(2) as pool:
        rotating = pool.submit(issuer.rotate)
        time.sleep(0.2)  # the rotation is talking to the authority now
        started = time.monotonic()
        assert issuer.authority() == before  # status and identity answer at once
        assert issuer.issued(first.gateway.spiffe_id) is not None
        assert issuer.identities(m) == first  # a refresh serves the current authority meanwhile
        assert time.monotonic() - started < 0.5
        serial = rotating.result(timeout=10)
    after = issuer.authority()
    assert after is not None and after["intermediate_serial"] == format(serial, "x")
    assert issuer.identities(m).gateway != first.gateway  # leaves from the new intermediate
    assert source.calls == 2  # one load, one rotation: a refresh never queued a second call


def test_concurrent_first_loads_call_the_authority_once(tmp_path: Path) -> None:
    source = _SlowAuthority(tmp_path, 0.5)
    issuer = IdentityIssuer(tmp_path, source=source)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: issuer.identities(model("v1")), range(4)))
    assert source.calls == 1
    assert len({r.gateway.trust_bundle_pem for r in results}) == 1

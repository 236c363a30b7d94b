"""What is issued for a sub-agent ends with its delegation: its certificate, its tool JWTs and
its join token expire no later than `expires_at`, whatever the normal lifetimes are."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import jwt
import pytest
from builders import model

from meshgate.controlplane.identity import IdentityIssuer
from meshgate.identity.tokens import TokenAuthority, TokenError
from meshgate.policy.model import AgentPolicy, Destination, EgressRule, PolicyModel

SUB = "researcher.web-1"


def with_sub(destinations: tuple[Destination, ...] | None = None) -> PolicyModel:
    base = model("v1", destinations)
    rule = EgressRule(base.destinations[0].name)
    agents = (
        AgentPolicy("researcher", "researcher", (rule,)),
        AgentPolicy("researcher", SUB, (rule,)),
    )
    return model("v1", base.destinations, agents=agents)


def test_a_sub_agents_certificate_ends_with_its_delegation_and_is_not_churned(
    tmp_path: Path,
) -> None:
    m = with_sub()
    issuer = IdentityIssuer(tmp_path)  # 1 h leaves
    ends = int(time.time()) + 5
    first = issuer.identities(m, {SUB: ends})
    sub_cert = issuer.issued(m.spiffe_id(SUB))
    own = issuer.issued(m.spiffe_id("researcher"))
    assert sub_cert is not None and own is not None
    assert sub_cert.not_after == dt.datetime.fromtimestamp(ends, dt.UTC)
    assert own.not_after - own.not_before > dt.timedelta(minutes=59)  # others keep the TTL
    # backdated for clock skew, the 5 s leaf is past its renewal point already: renewing would
    # only issue the same end again (an SDS push a pass), so it is kept until it ends
    assert sub_cert.renew_at < dt.datetime.now(dt.UTC)
    again = issuer.identities(m, {SUB: ends})
    assert again.agents[SUB] == first.agents[SUB]
    # the same name delegated again (deleted and re-created): a leaf for the new delegation
    later = issuer.identities(m, {SUB: ends + 60})
    assert later.agents[SUB] != first.agents[SUB]
    renewed = issuer.issued(m.spiffe_id(SUB))
    assert renewed is not None
    assert renewed.not_after == dt.datetime.fromtimestamp(ends + 60, dt.UTC)


def test_an_ended_delegation_gets_an_already_expired_certificate(tmp_path: Path) -> None:
    """A pass racing the expiry (read alive, issued a moment later) must not extend it."""
    m = with_sub()
    issuer = IdentityIssuer(tmp_path)
    ends = int(time.time()) - 1
    issuer.identities(m, {SUB: ends})
    cert = issuer.issued(m.spiffe_id(SUB))
    assert cert is not None
    assert cert.not_after <= dt.datetime.fromtimestamp(ends, dt.UTC) < dt.datetime.now(dt.UTC)
    assert cert.not_before < cert.not_after


def test_a_sub_agents_tool_jwts_end_with_its_delegation(tmp_path: Path) -> None:
    billing = Destination("billing", "billing.internal", 80, tls="none", identity="jwt")
    m = with_sub((billing,))
    issuer = IdentityIssuer(tmp_path)  # 10 min tool tokens
    ends = int(time.time()) + 30
    ids = issuer.identities(m, {SUB: ends})
    key = jwt.PyJWK.from_dict(issuer.tool_signer.jwks()["keys"][0]).key

    def exp(agent: str, tokens: dict[tuple[str, str], str]) -> int:
        claims = jwt.decode(
            tokens[(agent, "billing")], key, algorithms=["ES256"], audience="billing"
        )
        return int(claims["exp"])

    assert exp(SUB, ids.tool_tokens) == ends
    assert exp("researcher", ids.tool_tokens) >= int(time.time()) + 590
    assert issuer.identities(m, {SUB: ends}).tool_tokens == ids.tool_tokens


def test_a_join_token_never_outlives_its_not_after(tmp_path: Path) -> None:
    tokens = TokenAuthority(tmp_path)
    now = int(time.time())
    _, claims = tokens.create("agent/researcher.web-1", 3600, not_after=now + 30)
    assert claims.expires_at == now + 30
    token, claims = tokens.create("agent/researcher", 3600)
    assert tokens.verify(token).expires_at == claims.expires_at >= now + 3600
    with pytest.raises(TokenError, match="expire before it is issued"):
        tokens.create("agent/researcher.web-1", 3600, not_after=now - 1)

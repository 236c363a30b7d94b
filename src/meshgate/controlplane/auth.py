"""Authenticated xDS: the stream's join token decides who the node may be."""

from __future__ import annotations

from meshgate.controlplane.streams import StreamError
from meshgate.identity.tokens import TokenAuthority, TokenError, subject_allows

TOKEN_HEADER = "authorization"


class TokenAuthenticator:
    """Checks `authorization: Bearer <join token>` against the node id, before any config."""

    def __init__(self, authority: TokenAuthority) -> None:
        self.authority = authority

    def __call__(self, node_id: str, metadata: dict[str, str], peer: str) -> str:
        header = metadata.get(TOKEN_HEADER, "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise StreamError("UNAUTHENTICATED", "a join token is required (meshgate token create)")
        try:
            claims = self.authority.verify(token.strip())
            self.authority.check_bound(claims)  # a sub-agent's: only its current delegation's
        except TokenError as exc:
            raise StreamError("UNAUTHENTICATED", str(exc)) from None
        if not subject_allows(claims.subject, node_id):
            raise StreamError(
                "UNAUTHENTICATED",
                f"token is for {claims.subject}, not for node {node_id}",
            )
        return claims.subject

    def recheck(self, identity: str, metadata: dict[str, str]) -> None:
        """Before each response on an open stream of a sub-agent: its token must still be its
        current delegation's (deleted and re-created, the old holder's stream must not get the
        new one's certificate). No I/O: the signature and the registry's last read only."""
        name = identity.removeprefix("agent/")
        if name == identity or "." not in name:
            return
        _, _, token = metadata.get(TOKEN_HEADER, "").partition(" ")
        try:
            claims = self.authority.verify(token.strip(), check_revoked=False)
            self.authority.check_bound(claims)
        except TokenError as exc:
            raise StreamError("UNAUTHENTICATED", str(exc)) from None


class GatewaysOnly:
    """Who may call the control plane's limit store: gateways (their pacers), never sidecars.

    Agents' sidecars hold join tokens too; a store that answered them would let a node that is
    not a gateway spend or settle budgets."""

    def __init__(self, authority: TokenAuthority) -> None:
        self.authority = authority

    def __call__(self, metadata: dict[str, str], peer: str) -> None:
        scheme, _, token = metadata.get(TOKEN_HEADER, "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise PermissionError("a gateway's join token is required")
        try:
            claims = self.authority.verify(token.strip())
        except TokenError as exc:
            raise PermissionError(str(exc)) from None
        if not claims.subject.startswith("gateway/"):
            raise PermissionError(f"the limit store answers gateways only, not {claims.subject}")

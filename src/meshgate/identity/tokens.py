"""Join tokens: a node proves who it is before it gets any config or key.

Signed JWTs (EdDSA) from a key that lives only in the control plane's state directory. The
audience and expiry are checked, revoked token ids are refused, and the subject names the node
(`agent/<name>` or `gateway/<name>`) so a token cannot be used for another node.

A sub-agent's token (`agent/<parent>.<child>`) is also bound to its delegation: it is accepted
only while that sub-agent exists and its stored `token_id` is this token's (`sub_agent_token`,
set by the control plane's delegation), so deleting a sub-agent ends its token on every replica
(revoked.json may be read-only, and is per replica), and a later sub-agent of the same name is
not reachable with it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshgate.errors import MeshgateError
from meshgate.identity.keyfiles import load_or_create_key

AUDIENCE = "meshgate-xds"
ISSUER = "meshgate"


class TokenError(MeshgateError):
    """A token that must be refused; the message says why (never echoes the token)."""


@dataclass(frozen=True)
class TokenClaims:
    subject: str  # "agent/<name>" or "gateway/<name>"
    token_id: str
    expires_at: int


def signing_key_path(state_dir: Path) -> Path:
    """Where a state directory's join-token signing key lives (none: it issued no tokens)."""
    return state_dir / "tokens" / "signing-key.pem"


class TokenAuthority:
    """Issues and checks join tokens; state under `<state_dir>/tokens/` (key file mode 0600)."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "tokens"
        self._key = _load_or_create_key(signing_key_path(state_dir))
        self._public: Ed25519PublicKey = self._key.public_key()
        self._revoked: tuple[tuple[int, int], frozenset[str]] | None = None  # (mtime, size), ids
        # sub-agent name -> the token id its current delegation was issued (None: no such
        # sub-agent); no I/O (called per stream). None: no delegation here, no sub-agent token
        self.sub_agent_token: Callable[[str], str | None] | None = None

    def create(
        self,
        subject: str,
        ttl_seconds: int,
        *,
        not_after: int | None = None,
        token_id: str | None = None,
    ) -> tuple[str, TokenClaims]:
        """A token for `subject`, valid `ttl_seconds` and never past `not_after` (unix seconds:
        a sub-agent's token ends with its delegation); `token_id` as stored with a sub-agent
        before its token is signed (`new_token_id`)."""
        if ttl_seconds <= 0:
            raise TokenError("token lifetime must be positive")
        now = int(time.time())
        expires = now + ttl_seconds if not_after is None else min(now + ttl_seconds, not_after)
        if expires <= now:
            raise TokenError("token would expire before it is issued")
        claims = TokenClaims(subject, token_id or new_token_id(), expires)
        token = jwt.encode(
            {
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": subject,
                "iat": now,
                "exp": claims.expires_at,
                "jti": claims.token_id,
            },
            self._key,
            algorithm="EdDSA",
        )
        return token, claims

    def verify(self, token: str, *, check_revoked: bool = True) -> TokenClaims:
        """The claims of a token this authority signed, unexpired; `check_revoked` reads the
        revocation list (a file: not on the event loop)."""
        try:
            data = jwt.decode(
                token,
                self._public,
                algorithms=["EdDSA"],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "sub", "jti", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.InvalidAudienceError:
            raise TokenError("token is not for meshgate xDS (audience)") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature is not from this control plane") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}") from None
        claims = TokenClaims(str(data["sub"]), str(data["jti"]), int(data["exp"]))
        if check_revoked and claims.token_id in self.revoked():
            raise TokenError(f"token {claims.token_id} was revoked")
        return claims

    def check_bound(self, claims: TokenClaims) -> None:
        """TokenError unless a sub-agent's token is the one of its current delegation (other
        subjects pass)."""
        name = claims.subject.removeprefix("agent/")
        if name == claims.subject or "." not in name:
            return
        lookup = self.sub_agent_token
        if lookup is None:
            raise TokenError(f"{claims.subject} is a sub-agent: delegation is off here")
        stored = lookup(name)
        if stored is None:
            raise TokenError(f"sub-agent {name} no longer exists (deleted, expired or revoked)")
        if not stored or stored != claims.token_id:
            raise TokenError(
                f"token {claims.token_id} is not the one issued for sub-agent {name}'s current "
                "delegation"
            )

    def revoke(self, token_id: str) -> None:
        revoked = self.revoked() | {token_id}
        path = self.directory / "revoked.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(revoked)))
        os.replace(tmp, path)

    def revoked(self) -> set[str]:
        """Re-read only when the file changed: a mass reconnect checks it once per stream."""
        path = self.directory / "revoked.json"
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if self._revoked is None or self._revoked[0] != stamp:
                self._revoked = (stamp, frozenset(json.loads(path.read_text())))
            return set(self._revoked[1])
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            raise TokenError(f"{path}: unreadable ({exc})") from None


def new_token_id() -> str:
    return uuid.uuid4().hex


def subject_allows(subject: str, node_id: str) -> bool:
    """`agent/x` covers `agent/x` and its instances `agent/x/<id>`; `gateway/g` only itself."""
    return node_id == subject or (
        subject.startswith("agent/") and node_id.startswith(subject + "/")
    )


def _load_or_create_key(path: Path) -> Ed25519PrivateKey:
    def ed25519(key: object) -> Ed25519PrivateKey | None:
        return key if isinstance(key, Ed25519PrivateKey) else None

    return load_or_create_key(
        path, Ed25519PrivateKey.generate, ed25519, "an Ed25519 key", TokenError
    )

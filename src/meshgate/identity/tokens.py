"""Join tokens: a node proves who it is before it gets any config or key.

Signed JWTs (EdDSA) from a key that lives only in the control plane's state directory. The
audience and expiry are checked, revoked token ids are refused, and the subject names the node
(`agent/<name>` or `gateway/<name>`) so a token cannot be used for another node.
"""

from __future__ import annotations

import json
import os
import time
import uuid
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


class TokenAuthority:
    """Issues and checks join tokens; state under `<state_dir>/tokens/` (key file mode 0600)."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "tokens"
        self._key = _load_or_create_key(self.directory / "signing-key.pem")
        self._public: Ed25519PublicKey = self._key.public_key()
        self._revoked: tuple[tuple[int, int], frozenset[str]] | None = None  # (mtime, size), ids

    def create(
        self, subject: str, ttl_seconds: int, *, not_after: int | None = None
    ) -> tuple[str, TokenClaims]:
        """A token for `subject`, valid `ttl_seconds` and never past `not_after` (unix seconds:
        a sub-agent's token ends with its delegation)."""
        if ttl_seconds <= 0:
            raise TokenError("token lifetime must be positive")
        now = int(time.time())
        expires = now + ttl_seconds if not_after is None else min(now + ttl_seconds, not_after)
        if expires <= now:
            raise TokenError("token would expire before it is issued")
        claims = TokenClaims(subject, uuid.uuid4().hex, expires)
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

    def verify(self, token: str) -> TokenClaims:
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
        if claims.token_id in self.revoked():
            raise TokenError(f"token {claims.token_id} was revoked")
        return claims

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

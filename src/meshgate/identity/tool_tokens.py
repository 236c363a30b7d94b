"""JWTs that tell a tool which agent is calling (`identity: jwt` destinations).

Signed with ES256 (P-256), the algorithm every JWT library verifies, by a key kept only in the
control plane's state directory. The public half is served as a JWKS, so a tool can check
`sub` (the agent's SPIFFE ID) and `aud` (the destination's name) without trusting the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from meshgate.identity.ca import IdentityError
from meshgate.identity.keyfiles import load_or_create_key

ALGORITHM = "ES256"
KEY_FILE = "tool-jwt/signing-key.pem"


@dataclass(frozen=True)
class ToolToken:
    token: str
    issued_at: int
    expires_at: int

    @property
    def renew_at(self) -> int:
        """Half-life: the replacement is at the gateway long before this one expires."""
        return self.issued_at + (self.expires_at - self.issued_at) // 2


def issuer_for(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}"


class ToolTokenSigner:
    """Mints tool JWTs and publishes the key that verifies them."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / KEY_FILE
        self._key = _load_or_create_key(self.path)
        self.jwk = _public_jwk(self._key.public_key())
        self.key_id = str(self.jwk["kid"])

    def mint(self, subject: str, audience: str, issuer: str, ttl_seconds: int) -> ToolToken:
        now = int(time.time())
        claims = {
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "nbf": now - 5,  # tolerate small clock skew between us and the tool
            "exp": now + ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.key_id})
        return ToolToken(token, now, now + ttl_seconds)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}


def _public_jwk(public: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    numbers = public.public_numbers()
    x, y = (_b64(n.to_bytes(32, "big")) for n in (numbers.x, numbers.y))
    # RFC 7638 thumbprint: the kid stays the same for the same key on every replica
    canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": x, "y": y}, separators=(",", ":"))
    kid = _b64(hashlib.sha256(canonical.encode()).digest())
    return {"kty": "EC", "crv": "P-256", "x": x, "y": y, "use": "sig", "alg": ALGORITHM, "kid": kid}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    def p256(key: object) -> ec.EllipticCurvePrivateKey | None:
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
            return key
        return None

    return load_or_create_key(
        path, lambda: ec.generate_private_key(ec.SECP256R1()), p256, "a P-256 EC key", IdentityError
    )

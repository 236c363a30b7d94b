"""JWTs that tell a tool which agent is calling (`identity: jwt` destinations).

Signed with ES256 (P-256), the algorithm every JWT library verifies, by a key kept only in the
control plane's state directory. The public half is served as a JWKS, so a tool can check
`sub` (the agent's SPIFFE ID) and `aud` (the destination's name) without trusting the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshgate.identity.ca import IdentityError

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


def create_exclusive(path: Path, data: bytes) -> bool:
    """Write a whole 0600 file under `path` unless one exists (False then). Written aside and
    hard-linked into place, so a process that loses the race never reads a half-written key."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


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
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if not create_exclusive(path, pem):  # another replica created it first: use theirs
            return _load_or_create_key(path)
        return key
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except ValueError:
        raise IdentityError(f"{path}: not a PEM private key") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
        raise IdentityError(f"{path}: expected a P-256 EC key")
    return loaded

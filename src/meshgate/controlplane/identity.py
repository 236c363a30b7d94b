"""Issues and renews the workload certificates the snapshots carry (mTLS mode).

One certificate per node group: the gateways share `spiffe://<td>/gateway/egress`, each agent's
sidecars share `spiffe://<td>/agent/<name>`. A certificate is re-issued at half its lifetime;
the new one reaches Envoy over SDS and existing connections are not dropped.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any, Protocol

from meshgate.identity.ca import CertificateAuthority, IdentityError
from meshgate.identity.certs import IssuedCert, issue, spiffe_id
from meshgate.identity.tool_tokens import ToolToken, ToolTokenSigner, issuer_for
from meshgate.policy.model import PolicyModel
from meshgate.xds.build import Identities
from meshgate.xds.mtls import NodeIdentity
from meshgate.xds.tool_identity import tool_identity_pairs

GATEWAY_IDENTITY_NAME = "egress"
TOOL_TOKEN_TTL = dt.timedelta(minutes=10)


class AuthoritySource(Protocol):
    """Where the intermediate that signs leaves comes from (built-in CA, or Vault's PKI)."""

    description: str

    def load(self, trust_domain: str) -> CertificateAuthority: ...

    def refresh(self, ca: CertificateAuthority) -> CertificateAuthority | None:
        """A renewed authority when the current one is due, else None."""
        ...

    def rotate(self, ca: CertificateAuthority) -> CertificateAuthority: ...


class BuiltinAuthority:
    """Root and intermediate under <state>/ca; rotation only on request."""

    description = "builtin"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def load(self, trust_domain: str) -> CertificateAuthority:
        return CertificateAuthority.load_or_create(self.state_dir, trust_domain)

    def refresh(self, ca: CertificateAuthority) -> CertificateAuthority | None:
        return None

    def rotate(self, ca: CertificateAuthority) -> CertificateAuthority:
        ca.rotate_intermediate()
        return ca


class IdentityIssuer:
    def __init__(
        self,
        state_dir: Path,
        ttl: dt.timedelta = dt.timedelta(hours=1),
        source: AuthoritySource | None = None,
        tool_token_ttl: dt.timedelta = TOOL_TOKEN_TTL,
    ) -> None:
        self.state_dir = state_dir
        self.ttl = ttl
        self.tool_token_ttl = tool_token_ttl
        self.tool_signer = ToolTokenSigner(state_dir)
        self.source: AuthoritySource = source or BuiltinAuthority(state_dir)
        self._ca: CertificateAuthority | None = None
        self._issued: dict[str, tuple[IssuedCert, NodeIdentity]] = {}
        self._tool_tokens: dict[tuple[str, str], ToolToken] = {}
        self._tool_issuer = ""
        self._lock = threading.Lock()  # called from worker threads (compile, renewal watch)

    def identities(self, model: PolicyModel) -> Identities:
        """Current certificates for every node group of this policy, renewing any that are due."""
        with self._lock:
            ca = self._authority(model.mesh.trust_domain)
            td = model.mesh.trust_domain
            gateway = self._current(ca, spiffe_id(td, "gateway", GATEWAY_IDENTITY_NAME))
            agents = {
                a.agent: self._current(ca, spiffe_id(td, "agent", a.agent)) for a in model.agents
            }
            wanted = {gateway.spiffe_id, *(i.spiffe_id for i in agents.values())}
            for stale in set(self._issued) - wanted:  # agents removed from policy
                del self._issued[stale]
            return Identities(gateway, agents, self._current_tool_tokens(model))

    def rotate(self) -> int:
        """Roll the intermediate; every node gets a leaf from the new one on the next refresh.

        The trust bundle (roots) is unchanged, so leaves from the old intermediate keep
        verifying until they are replaced: no connection fails. Returns the new serial.
        """
        with self._lock:
            if self._ca is None:
                raise IdentityError("no certificate authority yet: no policy has been applied")
            self._ca = self.source.rotate(self._ca)
            self._issued.clear()
            return int(self._ca.intermediate.serial_number)

    def issued(self, spiffe: str) -> IssuedCert | None:
        with self._lock:
            entry = self._issued.get(spiffe)
            return entry[0] if entry else None

    def _current_tool_tokens(self, model: PolicyModel) -> dict[tuple[str, str], str]:
        """A JWT per (agent, `identity: jwt` destination) it may call, re-minted at half-life."""
        now = int(dt.datetime.now(dt.UTC).timestamp())
        ttl = int(self.tool_token_ttl.total_seconds())
        issuer = issuer_for(model.mesh.trust_domain)
        if issuer != self._tool_issuer:  # a new trust domain: every sub and iss changes
            self._tool_tokens, self._tool_issuer = {}, issuer
        fresh: dict[tuple[str, str], ToolToken] = {}
        for agent, dest in tool_identity_pairs(model):
            key = (agent, dest.name)
            token = self._tool_tokens.get(key)
            if token is None or now >= token.renew_at:
                token = self.tool_signer.mint(model.spiffe_id(agent), dest.name, issuer, ttl)
            fresh[key] = token
        self._tool_tokens = fresh  # pairs no longer in policy are dropped
        return {key: token.token for key, token in fresh.items()}

    def authority(self) -> dict[str, Any] | None:
        """Where the signing intermediate comes from and when it expires (status, identity)."""
        with self._lock:
            if self._ca is None:
                return None
            inter = self._ca.intermediate
            return {
                "source": self.source.description,
                "intermediate_serial": format(inter.serial_number, "x"),
                "intermediate_not_after": inter.not_valid_after_utc.isoformat(),
            }

    def _authority(self, trust_domain: str) -> CertificateAuthority:
        if self._ca is None or self._ca.trust_domain != trust_domain:
            self._ca = self.source.load(trust_domain)
            self._issued.clear()
        elif (renewed := self.source.refresh(self._ca)) is not None:
            self._ca = renewed  # every node gets a leaf from the new intermediate
            self._issued.clear()
        return self._ca

    def _current(self, ca: CertificateAuthority, spiffe: str) -> NodeIdentity:
        entry = self._issued.get(spiffe)
        if entry is not None and dt.datetime.now(dt.UTC) < entry[0].renew_at:
            return entry[1]
        cert = issue(ca, spiffe, self.ttl)
        ident = NodeIdentity(spiffe, cert.cert_chain_pem, cert.key_pem, ca.trust_bundle_pem())
        self._issued[spiffe] = (cert, ident)
        return ident

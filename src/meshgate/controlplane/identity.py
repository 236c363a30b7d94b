"""Issues and renews the workload certificates the snapshots carry (mTLS mode).

One certificate per node group: the gateways share `spiffe://<td>/gateway/egress`, each agent's
sidecars share `spiffe://<td>/agent/<name>`. The new certificate reaches Envoy over SDS and
existing connections are not dropped.

Renewal is spread: each certificate renews at its own point in `RENEW_WINDOW` of its lifetime,
drawn from a hash of its SPIFFE ID and serial (stable for that certificate, different across
groups), and one pass renews at most `renewals_per_pass` of them (certificates that are missing,
past `MUST_RENEW_FRACTION` or no longer trusted are issued regardless). 10,000 sidecars issued
together therefore do not all renew, and all get an SDS push, in one pass.

Threads call in (the policy compile, the runtime-input refresh, the admin API's rotate), and the
admin API reads `authority()` and `issued()` from the event loop. So, as httpcore's pool does,
state is decided under `_lock` and every slow step (the authority's Vault calls, key generation)
runs after it is released: nothing that waits on Vault ever holds the lock a reader needs.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from meshgate.identity.agent_trust import AgentTrustCA, HostCertificate, intercepted_hosts
from meshgate.identity.ca import CertificateAuthority, IdentityError, now_utc
from meshgate.identity.certs import IssuedCert, issue, spiffe_id
from meshgate.identity.tool_tokens import ToolToken, ToolTokenSigner, issuer_for
from meshgate.policy.model import PolicyModel
from meshgate.xds.build import Identities
from meshgate.xds.mtls import NodeIdentity
from meshgate.xds.tool_identity import tool_identity_pairs

GATEWAY_IDENTITY_NAME = "egress"
TOOL_TOKEN_TTL = dt.timedelta(minutes=10)
# Agent-trust leaves (identity/agent_trust.py) are the same for every sidecar, so each renewal
# is an SDS push to the whole fleet: a day keeps that to about one wave every 12-18 hours.
HOST_CERT_TTL = dt.timedelta(hours=24)
RENEW_WINDOW = (0.5, 0.75)  # renewal point, as fractions of a certificate's lifetime
MUST_RENEW_FRACTION = 0.9  # from here a certificate renews even over the pass budget
RENEWALS_PER_PASS = 100


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
        fresh = copy.copy(ca)  # readers of the current one never see half a rotation
        fresh.rotate_intermediate()
        return fresh


def renewal_fraction(spiffe: str, serial: int, window: tuple[float, float] = RENEW_WINDOW) -> float:
    """Where in `window` this certificate renews: a hash, so the same certificate always gets
    the same point (a restart does not re-draw it) and groups issued together spread out."""
    low, high = window
    digest = hashlib.sha256(f"{spiffe}\0{serial:x}".encode()).digest()
    return low + (high - low) * int.from_bytes(digest[:8], "big") / 2**64


def renewal_time(cert: IssuedCert, window: tuple[float, float] = RENEW_WINDOW) -> dt.datetime:
    lifetime = cert.not_after - cert.not_before
    return cert.not_before + lifetime * renewal_fraction(cert.spiffe_id, cert.serial, window)


@dataclass(frozen=True)
class _Leaf:
    cert: IssuedCert
    identity: NodeIdentity
    generation: int  # of the authority that signed it
    renew_at: dt.datetime
    must_renew_at: dt.datetime
    cap: dt.datetime | None = None  # a sub-agent's: when its delegation ends

    @property
    def ends_with_cap(self) -> bool:
        """Renewing gives a leaf that ends just the same: renew only for a new authority."""
        return self.cap is not None and self.cert.not_after >= self.cap


class IdentityIssuer:
    def __init__(
        self,
        state_dir: Path,
        ttl: dt.timedelta = dt.timedelta(hours=1),
        source: AuthoritySource | None = None,
        tool_token_ttl: dt.timedelta = TOOL_TOKEN_TTL,
        *,
        renew_window: tuple[float, float] = RENEW_WINDOW,
        renewals_per_pass: int = RENEWALS_PER_PASS,
        host_cert_ttl: dt.timedelta = HOST_CERT_TTL,
    ) -> None:
        low, high = renew_window
        if not 0 < low <= high < MUST_RENEW_FRACTION:
            raise ValueError(f"renew window {renew_window}: expected 0 < low <= high < 0.9")
        self.state_dir = state_dir
        self.ttl = ttl
        self.tool_token_ttl = tool_token_ttl
        self.host_cert_ttl = host_cert_ttl
        self.renew_window = renew_window
        self.renewals_per_pass = renewals_per_pass
        self.tool_signer = ToolTokenSigner(state_dir)
        self.source: AuthoritySource = source or BuiltinAuthority(state_dir)
        self._lock = threading.Lock()  # guards the fields below; never held across slow work
        self._ca: CertificateAuthority | None = None
        self._generation = 0  # bumped whenever the signing authority changes
        self._ca_job: Future[None] | None = None  # the one authority call (Vault) in flight
        self._issued: dict[str, _Leaf] = {}
        self._tool_tokens: dict[tuple[str, str], ToolToken] = {}
        self._tool_issuer = ""
        self._agent_trust: AgentTrustCA | None = None  # loaded on first use (a worker thread)
        self._host_certs: dict[str, HostCertificate] = {}

    def identities(self, model: PolicyModel, ends: Mapping[str, int] | None = None) -> Identities:
        """Current certificates for every node group of this policy, renewing those due (at
        most `renewals_per_pass` of the optional ones). `ends`: agent -> unix time its
        certificate and tool JWTs must not outlive (sub-agents: their delegation's expiry).
        Blocking: call from a worker thread."""
        td = model.mesh.trust_domain
        ca, generation = self._authority(td)
        gateway = spiffe_id(td, "gateway", GATEWAY_IDENTITY_NAME)
        agents = {a.agent: spiffe_id(td, "agent", a.agent) for a in model.agents}
        wanted = [gateway, *agents.values()]
        caps = {
            agents[agent]: dt.datetime.fromtimestamp(at, dt.UTC)
            for agent, at in (ends or {}).items()
            if agent in agents
        }
        with self._lock:
            todo = self._due(wanted, ca, generation, now_utc(), caps)
        fresh = {  # keys: slow
            spiffe: self._issue(ca, spiffe, generation, caps.get(spiffe)) for spiffe in todo
        }
        with self._lock:
            self._issued.update(fresh)
            for stale in set(self._issued) - set(wanted):  # agents removed from policy
                del self._issued[stale]
            current = {spiffe: self._issued[spiffe].identity for spiffe in wanted}
        return Identities(
            current[gateway],
            {agent: current[spiffe] for agent, spiffe in agents.items()},
            self._current_tool_tokens(model, ends or {}),
            self._host_certificates(intercepted_hosts(model)),
        )

    def rotate(self) -> int:
        """Roll the intermediate; every node gets a leaf from the new one over the next passes.

        The trust bundle (roots) is unchanged, so leaves from the old intermediate keep
        verifying until they are replaced: no connection fails. Returns the new serial.
        Blocking (the authority may call Vault): call from a worker thread.
        """
        while True:
            with self._lock:
                if self._ca is None:
                    raise IdentityError("no certificate authority yet: no policy has been applied")
                job = self._ca_job
                if job is None:
                    ca, job = self._ca, self._start_job()
                    break
            job.result()  # another authority call is in flight: rotate after it
        rotated: CertificateAuthority | None = None
        try:
            rotated = self.source.rotate(ca)
        finally:
            self._finish_job(job, rotated)
        return int(rotated.intermediate.serial_number)

    def issued(self, spiffe: str) -> IssuedCert | None:
        with self._lock:
            entry = self._issued.get(spiffe)
            return entry.cert if entry else None

    def authority(self) -> dict[str, Any] | None:
        """Where the signing intermediate comes from and when it expires (status, identity)."""
        with self._lock:
            ca = self._ca
        if ca is None:
            return None
        inter = ca.intermediate
        return {
            "source": self.source.description,
            "intermediate_serial": format(inter.serial_number, "x"),
            "intermediate_not_after": inter.not_valid_after_utc.isoformat(),
        }

    # -- the signing authority: one call at a time, none under the lock -----------------------

    def _start_job(self) -> Future[None]:
        job: Future[None] = Future()
        self._ca_job = job
        return job

    def _finish_job(self, job: Future[None], new: CertificateAuthority | None) -> None:
        with self._lock:
            if new is not None and new is not self._ca:
                self._ca = new
                self._generation += 1  # every leaf is now due, over the next passes
            self._ca_job = None
        job.set_result(None)

    def _authority(self, trust_domain: str) -> tuple[CertificateAuthority, int]:
        """The authority for `trust_domain`, loading it or renewing it when due. While another
        thread talks to the authority, the current one serves (waiting only if there is none)."""
        while True:
            with self._lock:
                ca, generation, job = self._ca, self._generation, self._ca_job
                usable = ca is not None and ca.trust_domain == trust_domain
                if job is None:
                    job = self._start_job()
                    break
            if usable:
                assert ca is not None
                return ca, generation
            job.result()
        new: CertificateAuthority | None = None
        try:
            new = (
                self.source.refresh(ca)
                if usable and ca is not None
                else self.source.load(trust_domain)
            )
        finally:
            self._finish_job(job, new)
        with self._lock:
            assert self._ca is not None
            return self._ca, self._generation

    # -- leaves --------------------------------------------------------------------------------

    def _due(
        self,
        wanted: list[str],
        ca: CertificateAuthority,
        generation: int,
        now: dt.datetime,
        caps: Mapping[str, dt.datetime],
    ) -> list[str]:
        """Which leaves this pass issues: every missing, untrusted or nearly expired one, then
        the most overdue of the rest (older authority first) up to the pass budget. A leaf that
        already ends with its delegation is not renewed for time (the new one would end then
        too); one of a delegation that changed (re-created under the same name) is reissued."""
        bundle = ca.trust_bundle_pem()
        must: list[str] = []
        optional: list[tuple[bool, dt.datetime, str]] = []
        for spiffe in wanted:
            entry = self._issued.get(spiffe)
            if (
                entry is None
                or entry.identity.trust_bundle_pem != bundle
                or entry.cap != caps.get(spiffe)
                or (now >= entry.must_renew_at and not entry.ends_with_cap)
            ):
                must.append(spiffe)
            elif entry.generation != generation or (
                now >= entry.renew_at and not entry.ends_with_cap
            ):
                optional.append((entry.generation == generation, entry.renew_at, spiffe))
        optional.sort()
        room = max(self.renewals_per_pass - len(must), 0)
        return must + [spiffe for *_, spiffe in optional[:room]]

    def _issue(
        self, ca: CertificateAuthority, spiffe: str, generation: int, cap: dt.datetime | None
    ) -> _Leaf:
        cert = issue(ca, spiffe, self.ttl, not_after=cap)
        ident = NodeIdentity(spiffe, cert.cert_chain_pem, cert.key_pem, ca.trust_bundle_pem())
        lifetime = cert.not_after - cert.not_before
        return _Leaf(
            cert,
            ident,
            generation,
            renewal_time(cert, self.renew_window),
            cert.not_before + lifetime * MUST_RENEW_FRACTION,
            cap,
        )

    def _host_certificates(self, hosts: tuple[str, ...]) -> dict[str, HostCertificate]:
        """Agent-trust leaves for the intercepted hosts (identity/agent_trust.py), renewed at a
        per-host point of the workload window; hosts no longer intercepted are dropped, so
        their leaves expire unrenewed."""
        with self._lock:
            ca, held = self._agent_trust, dict(self._host_certs)
        if ca is None:  # made even with no host yet: launchers give it to their agents at start
            ca = AgentTrustCA.load_or_create(self.state_dir)
        now = now_utc()
        fresh: dict[str, HostCertificate] = {}
        for host in hosts:
            cert = held.get(host)
            if cert is None or now >= self._host_renewal(cert):
                cert = ca.issue(host, self.host_cert_ttl)
            fresh[host] = cert
        with self._lock:
            self._agent_trust, self._host_certs = ca, fresh
        return fresh

    def _host_renewal(self, cert: HostCertificate) -> dt.datetime:
        lifetime = cert.not_after - cert.not_before
        serial = int.from_bytes(hashlib.sha256(cert.chain_pem).digest()[:8], "big")
        return cert.not_before + lifetime * renewal_fraction(cert.host, serial, self.renew_window)

    def _current_tool_tokens(
        self, model: PolicyModel, ends: Mapping[str, int]
    ) -> dict[tuple[str, str], str]:
        """A JWT per (agent, `identity: jwt` destination) it may call, re-minted at half-life;
        never valid past the agent's entry in `ends` (and not re-minted once it ends then)."""
        now = int(dt.datetime.now(dt.UTC).timestamp())
        ttl = int(self.tool_token_ttl.total_seconds())
        issuer = issuer_for(model.mesh.trust_domain)
        with self._lock:
            if issuer != self._tool_issuer:  # a new trust domain: every sub and iss changes
                self._tool_tokens, self._tool_issuer = {}, issuer
            held = dict(self._tool_tokens)
        fresh: dict[tuple[str, str], ToolToken] = {}
        for agent, dest in tool_identity_pairs(model):
            key = (agent, dest.name)
            token = held.get(key)
            end = ends.get(agent)
            capped = end is not None and token is not None and token.expires_at >= end
            if token is None or (now >= token.renew_at and not capped):
                life = ttl if end is None else min(ttl, end - now)
                token = self.tool_signer.mint(model.spiffe_id(agent), dest.name, issuer, life)
            fresh[key] = token
        with self._lock:
            self._tool_tokens = fresh  # pairs no longer in policy are dropped
        return {key: token.token for key, token in fresh.items()}

"""The running control plane: a composition root that wires small services, nothing more.

The pipeline, one service per stage, each startable and testable alone:

    PolicyPipeline      source -> debounce -> compile (worker thread) -> last good policy
      | PolicyConsumer
    SnapshotPublisher   policy + RuntimeInputs.read() -> build (worker thread) -> cache
      ^ InputsConsumer
    RuntimeInputs       secrets, certificates (IdentityIssuer), Consul instances: re-read off
                        the loop, changes pushed to the publisher
    SnapshotCache -> AdsService (streams) --+
    AuditIngest (own thread and loop) ------+-> XdsServer (one grpc.aio port, TLS)
    AdminServer (aiohttp) <- AdminView (this class: status, policy, identity ops, audit)
    Metrics (one registry; services report through narrow methods)

Rules every service follows: it depends on `Protocol`s (another service's narrow interface),
never on `ControlPlane`; it binds or opens in `start()` and releases in `stop()`; and nothing
that waits on Vault, Consul, git, a store or key generation runs on the event loop that serves
xDS (a worker thread, or the service's own thread), nor under a lock a reader on that loop needs.

A new service (a rate-limit or budget service, MCP authorisation, ...) plugs in the same way:
write it as a class with `start()`/`stop()` taking its dependencies as Protocols; if nodes call
it over gRPC, give it a `handler()` and add that to the `XdsServer` handlers below (same port,
same join token); if it needs policy, read `PolicyPipeline.state` or take a `PolicyConsumer`
slot; then construct it in `ControlPlane.__init__` and add it to `_services` in start order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from meshgate.audit.open import open_store, store_target
from meshgate.audit.shadow import ShadowDecisions
from meshgate.audit.sqlbase import SqlAuditStore
from meshgate.audit.store import AuditLogStore, AuditStore
from meshgate.controlplane.access_log import AuditIngest, AuditWriter
from meshgate.controlplane.admin import AdminServer, IdentityOps
from meshgate.controlplane.ads import AdsService
from meshgate.controlplane.auth import GatewaysOnly, TokenAuthenticator
from meshgate.controlplane.cache import SnapshotCache
from meshgate.controlplane.consul import ConsulCatalog
from meshgate.controlplane.delegation import Delegation
from meshgate.controlplane.identity import RENEW_WINDOW, IdentityIssuer
from meshgate.controlplane.metrics import Metrics
from meshgate.controlplane.pipeline import PolicyPipeline
from meshgate.controlplane.policy_state import PolicyState
from meshgate.controlplane.publisher import SnapshotPublisher
from meshgate.controlplane.registry import NodeRegistry
from meshgate.controlplane.runtime_inputs import RuntimeInputs
from meshgate.controlplane.services import Service
from meshgate.controlplane.sources import PolicySource
from meshgate.controlplane.streams import Authenticator, allow_all
from meshgate.controlplane.xds_server import XdsServer
from meshgate.delegation.registry import describe as describe_sub_agent
from meshgate.errors import ConfigError, MeshgateError
from meshgate.identity.admin_token import load_or_create_token, load_token_file, token_path
from meshgate.identity.certs import IssuedCert
from meshgate.identity.tokens import TokenAuthority
from meshgate.identity.xds_tls import ensure_serving_cert, load_serving_cert, withdraw_bundle
from meshgate.pacing.open import open_limit_store
from meshgate.pacing.store import LimitStore
from meshgate.pacing.store_service import store_service_handler
from meshgate.policy.model import PolicyModel
from meshgate.urls import redact_url, without_password
from meshgate.xds.options import DEFAULT_CA_BUNDLE, TranslateOptions

if TYPE_CHECKING:
    from meshgate.controlplane.vault_ca import VaultCASettings, VaultUpstreamCA

log = logging.getLogger(__name__)


def system_ca_bundle() -> str:
    """The host's CA bundle, which `tls: originate` trusts when a destination names no caFile."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, DEFAULT_CA_BUNDLE):
        if candidate and Path(candidate).is_file():
            return candidate
    return DEFAULT_CA_BUNDLE


@dataclass(frozen=True)
class ServeOptions:
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    admin_host: str = "127.0.0.1"
    admin_port: int = 18001
    gateway_bind: str = "127.0.0.1"
    system_ca_file: str = field(default_factory=system_ca_bundle)
    secrets_interval: float = 1.0
    require_tokens: bool = False  # every xDS stream must present a valid join token
    mtls: bool = False  # sidecar -> gateway mTLS with SPIFFE certificates over SDS
    cert_ttl_seconds: int = 3600
    cert_renew_window: tuple[float, float] = RENEW_WINDOW  # fractions of the lifetime
    xds_tls: bool = False  # serve the xDS port over TLS (built-in xDS CA unless files given)
    xds_cert_file: Path | None = None
    xds_key_file: Path | None = None
    vault_ca: VaultCASettings | None = None  # Vault's PKI signs the intermediate (needs mtls)
    debounce_quiet: float = 0.1
    debounce_max: float = 1.0
    gateway_address: tuple[str, int] | None = None  # where sidecars reach gateways (a Service)
    # audit store: path, sqlite:///path or postgresql://...; empty: $MESHGATE_AUDIT_STORE,
    # else SQLite at <state_dir>/audit.db
    audit_store: str = ""
    # budgets and global limits: redis://... shared with other control planes and gateways;
    # empty: the embedded store (this process, one control plane). `serve --limit-store`
    # defaults to $MESHGATE_LIMIT_STORE.
    limit_store: str = ""
    limit_store_password_file: Path | None = None
    # the admin API's bearer token; None: created once in <state_dir>/admin/token
    admin_token_file: Path | None = None
    # delegation (mTLS only): the endpoint gateways forward `meshgate.internal` to; port 0:
    # a free one. `delegation_address`: how gateways reach it, when not host:port.
    delegation_host: str = "127.0.0.1"
    delegation_port: int = 0
    delegation_address: tuple[str, int] | None = None
    # where sub-agents live: postgresql://... shared by every replica, else (empty) the state dir
    delegation_store: str = ""


class IssuerOps:
    """The admin API's identity operations: reads answer at once, rotation runs in a thread."""

    def __init__(self, issuer: IdentityIssuer) -> None:
        self.issuer = issuer

    def authority(self) -> dict[str, Any] | None:
        return self.issuer.authority()

    def issued(self, spiffe: str) -> IssuedCert | None:
        return self.issuer.issued(spiffe)

    def jwks(self) -> dict[str, Any]:
        return self.issuer.tool_signer.jwks()

    async def rotate(self) -> int:
        return await asyncio.to_thread(self.issuer.rotate)


class ControlPlane:
    """Wires the services (module docstring) and starts and stops them in order.

    It is also the `AdminView` the admin API reads: status assembled from the services."""

    def __init__(
        self,
        source: PolicySource,
        state_dir: Path,
        options: ServeOptions,
        audit_store: AuditStore | None = None,
    ) -> None:
        """`audit_store`: use this store instead of opening `options.audit_store` (tests)."""
        self.source = source
        self.state_dir = state_dir
        self.options = options
        self.cache = SnapshotCache()
        self.registry = NodeRegistry()
        self.metrics = Metrics(lambda: len(self.registry), lambda: len(self.registry.nacks()))
        self.tokens = TokenAuthority(state_dir) if options.require_tokens else None
        authenticate: Authenticator = (
            TokenAuthenticator(self.tokens) if self.tokens is not None else allow_all
        )
        self.translate = TranslateOptions(
            options.gateway_bind,
            options.system_ca_file,
            options.gateway_address,
        )
        self.vault_ca: VaultUpstreamCA | None = None
        if options.vault_ca is not None:
            if not options.mtls:
                raise ConfigError(
                    "--ca vault needs mTLS (not --insecure): certificates come only then"
                )
            from meshgate.controlplane.vault_ca import VaultUpstreamCA

            self.vault_ca = VaultUpstreamCA(options.vault_ca, state_dir)
        self.issuer = (
            IdentityIssuer(
                state_dir,
                dt.timedelta(seconds=options.cert_ttl_seconds),
                source=self.vault_ca,
                renew_window=options.cert_renew_window,
            )
            if options.mtls
            else None
        )
        self._identity_ops = IssuerOps(self.issuer) if self.issuer is not None else None

        # sub-agents: a runtime input, and the endpoint supervisors reach through the gateway
        self.delegation = (
            Delegation(
                state_dir,
                self.served_model,
                self.tokens,
                lambda: self.inputs.poke(),
                options.delegation_host,
                options.delegation_port,
                options.delegation_address,
                store=options.delegation_store,
            )
            if options.mtls
            else None
        )
        # the pipeline: source -> policy -> runtime inputs -> snapshots -> cache -> streams
        self.inputs = RuntimeInputs(
            self.issuer,
            lambda: self.publisher,
            interval=options.secrets_interval,
            delegation=self.delegation,
        )
        self.publisher = SnapshotPublisher(self.cache, self.translate, self.inputs)
        self.pipeline = PolicyPipeline(
            source,
            self.publisher,
            self.metrics,
            options.debounce_quiet,
            options.debounce_max,
        )
        self.ads = AdsService(self.cache, self.registry, authenticate)
        queue = self.ads.pusher.queue
        self.metrics.xds_pushes(lambda: queue.pending, lambda: queue.in_flight, self.ads.sent)

        # audit ingest beside xDS: same port and token, its own thread and loop
        self.audit_url = store_target(options.audit_store or None, state_dir)
        # what /v1/audit queries: the SQL stores offer more than the ingest interface
        self._audit_log: AuditLogStore | None = (
            audit_store if isinstance(audit_store, SqlAuditStore) else None
        )
        self.audit_ingest = AuditIngest(
            AuditWriter(
                (lambda: audit_store) if audit_store is not None else self._open_audit_store
            ),
            authenticate,
            on_commit=self.metrics.audit_committed,
            shadow=ShadowDecisions(lambda: self.pipeline.state.model, self.metrics.shadow_decision),
        )
        # budgets and global limits, served to gateways on the xDS port (gateways only)
        self._limit_store: LimitStore = open_limit_store(
            options.limit_store,
            options.limit_store_password_file,
        )
        self.xds_server: XdsServer | None = None  # made in start(): TLS credentials first
        self.admin_server: AdminServer | None = None  # made in start(): the token first
        self._started: list[Service] = []
        self.admin_token: str | None = None  # loaded by start()

    # -- the attributes tests, the CLI and the admin API read ----------------------------------

    @property
    def xds_address(self) -> str:
        """host:port; after start() the bound port (0 in the options asks the OS for one)."""
        if self.xds_server is not None:
            return self.xds_server.address
        return f"{self.options.xds_host}:{self.options.xds_port}"

    @property
    def admin_address(self) -> str:
        if self.admin_server is not None:
            return self.admin_server.address
        return f"{self.options.admin_host}:{self.options.admin_port}"

    @property
    def policy(self) -> PolicyState:
        return self.pipeline.state

    @property
    def ready(self) -> bool:
        """True once a policy has been applied (its snapshots are in the cache)."""
        return self.pipeline.state.model is not None

    @property
    def consul(self) -> ConsulCatalog:
        return self.inputs.consul

    @property
    def identity(self) -> IdentityOps | None:
        return self._identity_ops

    @property
    def audit_log(self) -> AuditLogStore | None:
        """What /v1/audit queries; None until the store is open (or when it cannot query)."""
        return self._audit_log

    @property
    def limit_store(self) -> LimitStore | None:
        return self._limit_store

    def metrics_text(self) -> bytes:
        return self.metrics.exposition()

    def missing_secrets(self) -> list[str]:
        return self.publisher.missing_secrets()

    def served_model(self) -> PolicyModel | None:
        return self.publisher.served_model()

    def status_json(self) -> dict[str, Any]:
        return {
            "control_plane": {
                "xds": self.xds_address,
                "admin": self.admin_address,
                "ready": self.ready,
                # the endpoint gateways forward `meshgate.internal` to (None: delegation off)
                "delegation": (self.delegation.address() if self.delegation is not None else None),
            },
            "policy": {**self.policy.to_json(), "missing_secrets": self.missing_secrets()},
            "ca": self.issuer.authority() if self.issuer is not None else None,
            "nodes": [c.to_json() for c in self.registry.connections()],
            "recent_nacks": [n.to_json() for n in self.registry.nacks()],
            "consul": self.consul.status_json(),  # watched services (issue 13)
            # sub-agents and who delegated to them (None: delegation off, needs mTLS)
            "sub_agents": (
                [describe_sub_agent(s) for s in self.delegation.sub_agents()]
                if self.delegation is not None
                else None
            ),
        }

    # -- lifecycle ----------------------------------------------------------------------------

    def _open_audit_store(self) -> AuditStore:
        try:
            store = open_store(self.audit_url)
        except MeshgateError:
            raise
        except Exception as exc:
            where = redact_url(self.audit_url)
            detail = without_password(str(exc), self.audit_url)
            raise ConfigError(f"cannot open the audit store {where}: {detail}") from None
        self._audit_log = store
        return store

    async def start(self) -> None:
        """Check what can fail in one line (Vault, TLS files, the admin token), then start the
        services: audit store, xDS port, admin port, runtime inputs, policy pipeline."""
        if self.vault_ca is not None:  # Vault unreachable, nothing stored: fail now, one line
            await asyncio.to_thread(self.vault_ca.preflight)
        # a bad certificate or token fails before anything opens; both may touch disk or
        # generate a key, so neither runs on the event loop
        credentials = await asyncio.to_thread(self._xds_credentials)
        self.admin_token = await asyncio.to_thread(self._load_admin_token)
        opts = self.options
        self.xds_server = XdsServer(
            opts.xds_host,
            opts.xds_port,
            # access logs and the limit store share the xDS port: every node already reaches it,
            # with the same token (the store answers gateways only)
            (
                self.ads.handler(),
                self.audit_ingest.handler(),
                store_service_handler(
                    self._limit_store,
                    authorize=GatewaysOnly(self.tokens) if self.tokens is not None else None,
                ),
            ),
            credentials,
        )
        self.admin_server = AdminServer(self, self.admin_token, opts.admin_host, opts.admin_port)
        services: list[Service] = [
            self.audit_ingest,
            self.xds_server,
            self.admin_server,
            *([self.delegation] if self.delegation is not None else []),
            self.inputs,
            self.pipeline,
        ]
        for service in services:
            try:
                await service.start()
            except BaseException:
                await self.stop()
                raise
            self._started.append(service)
        # the bound ports, for whoever builds bootstraps from the options (port 0 given)
        self.options = dataclasses.replace(
            opts, xds_port=self.xds_server.port, admin_port=self.admin_server.port
        )
        log.info(
            "xDS on %s, admin on http://%s (its token: %s)",
            self.xds_address,
            self.admin_address,
            opts.admin_token_file or token_path(self.state_dir),
        )

    async def stop(self) -> None:
        """Stop the started services in reverse order; the audit store closes last."""
        while self._started:
            service = self._started.pop()
            try:
                await service.stop()
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)
        await self._limit_store.close()

    def _load_admin_token(self) -> str:
        if self.options.admin_token_file is not None:
            return load_token_file(self.options.admin_token_file)
        return load_or_create_token(self.state_dir)

    def _xds_credentials(self) -> grpc.ServerCredentials | None:
        opts = self.options
        if not opts.xds_tls:
            withdraw_bundle(self.state_dir)  # local launchers must not expect TLS from us
            return None
        if opts.xds_cert_file is not None and opts.xds_key_file is not None:
            cert = load_serving_cert(opts.xds_cert_file, opts.xds_key_file)
        elif opts.xds_cert_file is not None or opts.xds_key_file is not None:
            raise ConfigError("--xds-cert and --xds-key go together")
        else:
            cert = ensure_serving_cert(self.state_dir, opts.xds_host)
        return grpc.ssl_server_credentials([(cert.key_pem, cert.chain_pem)])

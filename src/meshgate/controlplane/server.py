"""The running control plane: policy source -> debounce -> snapshots -> ADS; plus admin HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import prometheus_client
from aiohttp import web

from meshgate.audit.open import open_store, store_target
from meshgate.audit.sqlbase import SqlAuditStore
from meshgate.audit.store import AuditLogStore, AuditStore
from meshgate.controlplane.access_log import AccessLogService, AuditWriter
from meshgate.controlplane.admin import make_app
from meshgate.controlplane.ads import SERVER_OPTIONS, AdsService
from meshgate.controlplane.auth import TokenAuthenticator
from meshgate.controlplane.cache import SnapshotCache
from meshgate.controlplane.consul import ConsulCatalog
from meshgate.controlplane.debounce import Debouncer
from meshgate.controlplane.identity import IdentityIssuer
from meshgate.controlplane.policy_state import PolicyState
from meshgate.controlplane.registry import NodeRegistry
from meshgate.controlplane.secrets import SecretProvider, make_provider, read_secrets
from meshgate.controlplane.sources import Candidate, PolicySource, SourceFailure
from meshgate.controlplane.streams import Authenticator, allow_all
from meshgate.errors import ConfigError, MeshgateError, PolicyError
from meshgate.identity.admin_token import load_or_create_token, load_token_file, token_path
from meshgate.identity.tokens import TokenAuthority
from meshgate.identity.xds_tls import ensure_serving_cert, load_serving_cert, withdraw_bundle
from meshgate.policy.loader import load_policy_texts
from meshgate.policy.model import PolicyModel
from meshgate.policy.paths import resolve_relative_paths
from meshgate.xds.build import Identities, build_snapshots
from meshgate.xds.gateway import Endpoints
from meshgate.xds.options import DEFAULT_CA_BUNDLE, TranslateOptions
from meshgate.xds.snapshot import Snapshot

if TYPE_CHECKING:
    from meshgate.controlplane.vault_ca import VaultCASettings, VaultUpstreamCA

log = logging.getLogger(__name__)


def redact_url(url: str) -> str:
    """The URL without its password, for errors and logs (a DSN usually carries one)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def system_ca_bundle() -> str:
    """The host's CA bundle, which `tls: originate` trusts when a destination names no caFile."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, DEFAULT_CA_BUNDLE):
        if candidate and Path(candidate).is_file():
            return candidate
    return DEFAULT_CA_BUNDLE


@dataclass(frozen=True)
class Serving:
    """The resolved policy being served and the runtime inputs its snapshots were built from."""

    model: PolicyModel
    provider: SecretProvider
    secrets: dict[str, str]
    identities: Identities | None
    endpoints: Endpoints = field(default_factory=dict)  # Consul instances per destination

    def build(self, translate: TranslateOptions) -> dict[str, Snapshot]:
        return build_snapshots(self.model, translate, self.secrets, self.identities, self.endpoints)


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
    # the admin API's bearer token; None: created once in <state_dir>/admin/token
    admin_token_file: Path | None = None


class ControlPlane:
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
        self.policy = PolicyState(source.description)
        self.tokens = TokenAuthority(state_dir) if options.require_tokens else None
        authenticate: Authenticator = (
            TokenAuthenticator(self.tokens) if self.tokens is not None else allow_all
        )
        self.ads = AdsService(self.cache, self.registry, authenticate)
        self.audit_url = store_target(options.audit_store or None, state_dir)
        # what /v1/audit queries: the SQL stores offer more than the ingest interface
        self.audit_log: AuditLogStore | None = (
            audit_store if isinstance(audit_store, SqlAuditStore) else None
        )
        self.audit = AuditWriter(
            (lambda: audit_store) if audit_store is not None else self._open_audit_store
        )
        self.access_log = AccessLogService(self.audit, authenticate, on_commit=self._count_audit)
        self.debouncer: Debouncer[Candidate] = Debouncer(
            self._apply, options.debounce_quiet, options.debounce_max
        )
        self.metrics_registry = prometheus_client.CollectorRegistry()
        self._m_applied = prometheus_client.Counter(
            "meshgate_policy_applied", "Policy versions applied", registry=self.metrics_registry
        )
        self._m_rejected = prometheus_client.Counter(
            "meshgate_policy_rejected", "Policy changes refused", registry=self.metrics_registry
        )
        self._m_audit = prometheus_client.Counter(
            "meshgate_audit_records",
            "Audit records received over the access-log service",
            registry=self.metrics_registry,
        )
        self._m_audit_new = prometheus_client.Counter(
            "meshgate_audit_records_stored",
            "Audit records stored (received minus resent duplicates)",
            registry=self.metrics_registry,
        )
        prometheus_client.Gauge(
            "meshgate_xds_streams", "Connected xDS streams", registry=self.metrics_registry
        ).set_function(lambda: len(self.registry))
        prometheus_client.Gauge(
            "meshgate_xds_nacks", "NACKs in recent history", registry=self.metrics_registry
        ).set_function(lambda: len(self.registry.nacks()))
        self.xds_address = f"{options.xds_host}:{options.xds_port}"
        self.admin_address = f"{options.admin_host}:{options.admin_port}"
        self._grpc: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = False
        self.admin_token: str | None = None  # loaded by start()
        self.translate = TranslateOptions(
            options.gateway_bind,
            options.system_ca_file,
            options.gateway_address,
        )
        self._serving: Serving | None = None
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
                state_dir, dt.timedelta(seconds=options.cert_ttl_seconds), source=self.vault_ca
            )
            if options.mtls
            else None
        )
        self.consul = ConsulCatalog(self._consul_changed)
        self._consul_dirty = asyncio.Event()

    def _open_audit_store(self) -> AuditStore:
        try:
            store = open_store(self.audit_url)
        except MeshgateError:
            raise
        except Exception as exc:
            where = redact_url(self.audit_url)
            detail = str(exc).replace(self.audit_url, where)
            raise ConfigError(f"cannot open the audit store {where}: {detail}") from None
        self.audit_log = store
        return store

    def _count_audit(self, received: int, new: int) -> None:
        self._m_audit.inc(received)
        self._m_audit_new.inc(new)

    async def start(self) -> None:
        """Open the audit store, bind both ports (a clear error if taken), watch policy."""
        if self.vault_ca is not None:  # Vault unreachable, nothing stored: fail now, one line
            await asyncio.to_thread(self.vault_ca.preflight)
        credentials = self._xds_credentials()  # a bad certificate fails before anything opens
        token_file = self.options.admin_token_file or token_path(self.state_dir)
        self.admin_token = await asyncio.to_thread(self._load_admin_token)  # so does a bad token
        try:
            await self.audit.open()
        except BaseException:
            await self.audit.close()
            raise
        self._grpc = grpc.aio.server(options=SERVER_OPTIONS)
        # access logs share the xDS port: every node already reaches it, with the same token
        self._grpc.add_generic_rpc_handlers((self.ads.handler(), self.access_log.handler()))
        try:
            if credentials is None:
                port = self._grpc.add_insecure_port(self.xds_address)
            else:
                port = self._grpc.add_secure_port(self.xds_address, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            await self.audit.close()
            raise ConfigError(f"cannot listen for xDS on {self.xds_address}: address in use?")
        self.xds_address = f"{self.options.xds_host}:{port}"  # port 0 asks the OS for one
        await self._grpc.start()
        self._runner = web.AppRunner(make_app(self, self.admin_token), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.admin_host, self.options.admin_port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ConfigError(
                f"cannot listen for admin HTTP on {self.admin_address}: {exc.strerror}"
            ) from None
        bound = self._runner.addresses  # port 0 asks the OS for one
        if bound:
            self.admin_address = f"{self.options.admin_host}:{bound[0][1]}"
        self._tasks = [
            asyncio.create_task(self.debouncer.run(), name="debounce"),
            asyncio.create_task(self._watch_source(), name="policy-source"),
            asyncio.create_task(self._watch_runtime_inputs(), name="secrets-and-certificates"),
            asyncio.create_task(self._watch_consul(), name="consul-endpoints"),
        ]
        log.info(
            "xDS on %s, admin on http://%s (its token: %s)",
            self.xds_address,
            self.admin_address,
            token_file,
        )

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

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.consul.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.audit.close()

    async def _watch_source(self) -> None:
        async for change in self.source.changes():
            if isinstance(change, SourceFailure):
                self._reject(self.source.description, change.problems)
            else:
                self.debouncer.submit(change)

    async def _apply(self, candidate: Candidate) -> None:
        """Validate, compile and build off the event loop; swap in only when all succeed."""
        try:
            model, snapshots = await asyncio.to_thread(self._compile, candidate)
        except PolicyError as exc:
            self._reject(candidate.origin, exc.problems)
            return
        except MeshgateError as exc:
            self._reject(candidate.origin, [str(exc)])
            return
        except Exception as exc:  # a translation bug must not stop later policy updates
            log.exception("internal error while compiling policy from %s", candidate.origin)
            self._reject(candidate.origin, [f"internal error while compiling policy: {exc!r}"])
            return
        self.cache.set_snapshots(snapshots)
        await self._configure_consul()
        self.policy.applied(model, candidate.origin)
        self._m_applied.inc()
        self.ready = True
        log.info(
            "policy %s applied: %d agents, %d destinations",
            model.version,
            len(model.agents),
            len(model.destinations),
        )

    def _compile(self, candidate: Candidate) -> tuple[PolicyModel, dict[str, Snapshot]]:
        model = load_policy_texts(candidate.files, candidate.version)
        resolved = resolve_relative_paths(model, candidate.root)
        provider = make_provider(resolved.mesh.secrets)
        serving = Serving(
            resolved,
            provider,
            *self._runtime_inputs(resolved, provider),
            self.consul.endpoints(resolved),
        )
        snapshots = serving.build(self.translate)
        self._serving = serving
        return model, snapshots

    def _runtime_inputs(
        self, model: PolicyModel, provider: SecretProvider
    ) -> tuple[dict[str, str], Identities | None]:
        """What snapshots need besides policy: secret values and (mTLS) current certificates."""
        identities = self.issuer.identities(model) if self.issuer is not None else None
        return read_secrets(model, provider), identities

    async def _watch_runtime_inputs(self) -> None:
        """Push rotated secrets and renewed certificates without a restart or a policy change."""
        while True:
            await asyncio.sleep(self.options.secrets_interval)
            serving = self._serving
            if serving is None:
                continue
            try:
                secrets, identities = await asyncio.to_thread(
                    self._runtime_inputs, serving.model, serving.provider
                )
                if secrets == serving.secrets and identities == serving.identities:
                    continue
                fresh = dataclasses.replace(serving, secrets=secrets, identities=identities)
                snapshots = await asyncio.to_thread(fresh.build, self.translate)
            except Exception:  # never let a provider hiccup stop rotation for good
                log.exception("refreshing secrets or certificates failed")
                continue
            if self._serving is serving:  # no policy change won the race meanwhile
                self._serving = fresh
                self.cache.set_snapshots(snapshots)
                log.info("secrets or certificates changed; pushed to the nodes that hold them")

    # -- consul (issue 13): catalogue instances are a runtime input of the gateway snapshot -----

    def _consul_changed(self) -> None:
        self._consul_dirty.set()

    async def _configure_consul(self) -> None:
        """Watch the services the policy just applied names (unchanged ones keep watching)."""
        serving = self._serving
        if serving is None:
            return
        try:
            await self.consul.configure(serving.model, serving.provider)
        except Exception:  # the policy is applied; a watcher bug must not undo or block that
            log.exception("consul: configuring the catalogue watches failed")

    async def _watch_consul(self) -> None:
        """Rebuild when instances change: only the destination's ClusterLoadAssignment differs,
        so nodes get an EDS push and nothing else."""
        while True:
            await self._consul_dirty.wait()
            self._consul_dirty.clear()
            serving = self._serving
            if serving is None:
                continue
            endpoints = self.consul.endpoints(serving.model)
            if endpoints == serving.endpoints:
                continue
            fresh = dataclasses.replace(serving, endpoints=endpoints)
            try:
                snapshots = await asyncio.to_thread(fresh.build, self.translate)
            except Exception:
                log.exception("rebuilding after a Consul change failed")
                continue
            if self._serving is serving:
                self._serving = fresh
                self.cache.set_snapshots(snapshots)
            else:  # a policy or secret change won the race: redo against what serves now
                self._consul_dirty.set()

    # -- end consul ------------------------------------------------------------------------------

    def missing_secrets(self) -> list[str]:
        if self._serving is None:
            return []
        model, values = self._serving.model, self._serving.secrets
        return sorted(
            {d.credentials.secret for d in model.destinations if d.credentials} - set(values)
        )

    def _reject(self, origin: str, problems: list[str]) -> None:
        self.policy.rejected(origin, problems)
        self._m_rejected.inc()
        kept = self.policy.model.version if self.policy.model else "none"
        log.error("policy change refused (still serving %s):\n  %s", kept, "\n  ".join(problems))

"""Admin HTTP: status as JSON, health and readiness, the served policy, Prometheus metrics.

`AdminServer` depends only on `AdminView`, a read-only view of the control plane plus the
identity operations, so it can be started and tested without the rest. Handlers never block:
what they read is in memory, and what waits (a CA rotation through Vault, audit queries) runs
in a worker thread.

Every route needs the operator token (`Authorization: Bearer`, docs/admin-auth.md) except
`PUBLIC_PATHS`: probes, the tool-JWT public keys, and label-free counters.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any, Protocol

import prometheus_client
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from meshgate.audit.http import add_audit_routes
from meshgate.audit.store import AuditLogStore
from meshgate.controlplane.policy_state import PolicyState
from meshgate.errors import MeshgateError
from meshgate.http_listen import listen
from meshgate.identity.certs import IssuedCert, describe
from meshgate.pacing.report import budget_rows
from meshgate.pacing.store import LimitStore, StoreUnavailable
from meshgate.policy.model import PolicyModel
from meshgate.policy.plan import describe_rule
from meshgate.policy.serialize import model_to_json

log = logging.getLogger(__name__)

# Public by design: kubelet probes (/healthz, /readyz), the keys tools verify JWTs with, and
# Prometheus counters without labels (no agent, destination or policy content; docs/admin-auth.md).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/.well-known/jwks.json", "/metrics"})
REALM = 'Bearer realm="meshgate-admin"'


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _bearer(header: str) -> str | None:
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def token_middleware(token: str) -> Middleware:
    """Refuse, with 401 and `WWW-Authenticate`, every request to a non-public route (unknown
    paths included) whose bearer token is not `token`; compared in constant time."""
    expected = _digest(token)

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical in PUBLIC_PATHS:
            return await handler(request)
        given = _bearer(request.headers.get("Authorization", ""))
        if given is not None and hmac.compare_digest(_digest(given), expected):
            return await handler(request)
        if given is None:
            error, challenge = "admin token required (Authorization: Bearer <token>)", REALM
        else:
            error, challenge = "invalid admin token", f'{REALM}, error="invalid_token"'
        log.warning(
            "admin API: refused %s %s from %s: %s",
            request.method,
            request.path,
            request.remote,
            "no token" if given is None else "wrong token",
        )
        return web.json_response(
            {"error": error}, status=401, headers={"WWW-Authenticate": challenge}
        )

    return require_token


class IdentityOps(Protocol):
    """What the admin API may do with workload identity (mTLS on). Reads answer at once."""

    def authority(self) -> dict[str, Any] | None: ...

    def issued(self, spiffe: str) -> IssuedCert | None: ...

    def jwks(self) -> dict[str, Any]: ...

    async def rotate(self) -> int:
        """Roll the signing intermediate (off the event loop); the new serial."""
        ...


class AdminView(Protocol):
    """The read-only view of the control plane the admin API serves."""

    @property
    def ready(self) -> bool: ...

    @property
    def policy(self) -> PolicyState: ...

    @property
    def identity(self) -> IdentityOps | None:
        """None when mTLS is off."""
        ...

    def status_json(self) -> dict[str, Any]: ...

    def served_model(self) -> PolicyModel | None:
        """The policy as served: with sub-agents (delegation); None before the first build."""
        ...

    def metrics_text(self) -> bytes:
        """The Prometheus exposition."""
        ...

    @property
    def audit_log(self) -> AuditLogStore | None: ...

    @property
    def limit_store(self) -> LimitStore | None:
        """Where budgets are counted (the embedded store, or Redis); None: none configured."""
        ...


STORE_TIMEOUT = 5.0  # seconds an operator waits for budget counters before a clear 503


def make_app(cp: AdminView, admin_token: str) -> web.Application:
    """The admin API; all but `PUBLIC_PATHS` answer only to `Authorization: Bearer admin_token`."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        if cp.ready:
            return web.json_response(
                {"ready": True, "version": cp.policy.model.version if cp.policy.model else None}
            )
        reason = "no valid policy loaded yet" if cp.policy.model is None else "starting"
        return web.json_response({"ready": False, "reason": reason}, status=503)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(cp.status_json())

    async def policy(_: web.Request) -> web.Response:
        if cp.policy.model is None:
            return web.json_response({"error": "no policy loaded"}, status=404)
        return web.json_response(model_to_json(cp.policy.model))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=cp.metrics_text(), headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    async def jwks(_: web.Request) -> web.Response:
        """Public keys that verify tool JWTs (`identity: jwt`); a tool may cache them briefly."""
        if cp.identity is None:
            return web.json_response(
                {"error": "tool identity needs mTLS (serve without --insecure)"},
                status=404,
            )
        return web.json_response(cp.identity.jwks(), headers={"Cache-Control": "max-age=300"})

    async def identity(request: web.Request) -> web.Response:
        agent = request.match_info["agent"]
        model = cp.policy.model
        if model is None:
            return web.json_response({"error": "no policy loaded"}, status=404)
        policy = model.agent(agent)
        spiffe = model.spiffe_id(agent)
        ops = cp.identity
        cert = ops.issued(spiffe) if ops is not None else None
        if policy is None and cert is None:  # (a sub-agent has a certificate, not a policy)
            return web.json_response(
                {"error": f"no agent {agent!r} in policy {model.version}"}, status=404
            )
        return web.json_response(
            {
                "agent": agent,
                "spiffe_id": spiffe,
                "certificate": describe(cert.cert_chain_pem) if cert else None,
                "mtls": ops is not None,
                "ca": ops.authority() if ops is not None else None,
                "rules": [describe_rule(r) for r in policy.rules] if policy else [],
            }
        )

    async def rotate_ca(_: web.Request) -> web.Response:
        if cp.identity is None:
            return web.json_response({"error": "mTLS is off (serve --insecure)"}, status=409)
        try:
            serial = await cp.identity.rotate()
        except MeshgateError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response({"rotated": True, "intermediate_serial": f"{serial:x}"})

    async def budgets(request: web.Request) -> web.Response:
        """Every budget that applies (to `?agent=NAME`), with spent and reserved now: of the
        model served, so sub-agents and the budgets they share with their parent show."""
        model = cp.served_model() or cp.policy.model
        if model is None:
            return web.json_response({"error": "no policy loaded"}, status=404)
        agent = request.query.get("agent") or None
        if agent is not None and model.agent(agent) is None:
            return web.json_response({"error": f"no AgentPolicy for agent {agent!r}"}, status=404)
        store = cp.limit_store
        if store is None:
            return web.json_response({"error": "this control plane has no limit store"}, status=503)
        try:
            states = await asyncio.wait_for(store.budgets(), STORE_TIMEOUT)
        except (StoreUnavailable, TimeoutError) as exc:
            why = str(exc) or f"no answer in {STORE_TIMEOUT:g}s"
            return web.json_response(
                {"error": f"the limit store is unavailable: {why}"}, status=503
            )
        now = time.time()
        rows = budget_rows(model, states, now, agent)
        return web.json_response({"now": int(now), "budgets": [r.to_json() for r in rows]})

    app = web.Application(middlewares=[token_middleware(admin_token)])
    app.router.add_get("/v1/budgets", budgets)
    app.router.add_post("/v1/ca/rotate", rotate_ca)
    app.router.add_get("/v1/identity/{agent}", identity)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/v1/policy", policy)
    app.router.add_get("/metrics", metrics)
    add_audit_routes(app, lambda: cp.audit_log)
    return app


class AdminServer:
    """The admin HTTP listener (aiohttp) on `host:port` (0 asks the OS for one)."""

    def __init__(self, view: AdminView, token: str, host: str, port: int) -> None:
        self.host = host
        self.port = port  # the bound one after start()
        self.app = make_app(view, token)
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._runner, self.port = await listen(self.app, self.host, self.port, "admin HTTP")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

"""Admin HTTP: status as JSON, health and readiness, the served policy, Prometheus metrics.

Every route needs the operator token (`Authorization: Bearer`, docs/admin-auth.md) except
`PUBLIC_PATHS`: probes, the tool-JWT public keys, and label-free counters.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import TYPE_CHECKING, Any

import prometheus_client
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from meshgate.audit.http import add_audit_routes
from meshgate.errors import MeshgateError
from meshgate.identity.certs import describe
from meshgate.policy.plan import describe_rule
from meshgate.policy.serialize import model_to_json

if TYPE_CHECKING:
    from meshgate.controlplane.server import ControlPlane

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


def status_json(cp: ControlPlane) -> dict[str, Any]:
    return {
        "control_plane": {"xds": cp.xds_address, "admin": cp.admin_address, "ready": cp.ready},
        "policy": {**cp.policy.to_json(), "missing_secrets": cp.missing_secrets()},
        "ca": cp.issuer.authority() if cp.issuer is not None else None,
        "nodes": [c.to_json() for c in cp.registry.connections()],
        "recent_nacks": [n.to_json() for n in cp.registry.nacks()],
        "consul": cp.consul.status_json(),  # watched services (issue 13)
    }


def make_app(cp: ControlPlane, admin_token: str) -> web.Application:
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
        return web.json_response(status_json(cp))

    async def policy(_: web.Request) -> web.Response:
        if cp.policy.model is None:
            return web.json_response({"error": "no policy loaded"}, status=404)
        return web.json_response(model_to_json(cp.policy.model))

    async def metrics(_: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(cp.metrics_registry)
        return web.Response(
            body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    async def jwks(_: web.Request) -> web.Response:
        """Public keys that verify tool JWTs (`identity: jwt`); a tool may cache them briefly."""
        if cp.issuer is None:
            return web.json_response(
                {"error": "tool identity needs mTLS (serve without --insecure)"},
                status=404,
            )
        return web.json_response(
            cp.issuer.tool_signer.jwks(), headers={"Cache-Control": "max-age=300"}
        )

    async def identity(request: web.Request) -> web.Response:
        agent = request.match_info["agent"]
        model = cp.policy.model
        if model is None:
            return web.json_response({"error": "no policy loaded"}, status=404)
        policy = model.agent(agent)
        spiffe = model.spiffe_id(agent)
        cert = cp.issuer.issued(spiffe) if cp.issuer is not None else None
        return web.json_response(
            {
                "agent": agent,
                "spiffe_id": spiffe,
                "certificate": describe(cert.cert_chain_pem) if cert else None,
                "mtls": cp.issuer is not None,
                "ca": cp.issuer.authority() if cp.issuer is not None else None,
                "rules": [describe_rule(r) for r in policy.rules] if policy else [],
            }
        )

    async def rotate_ca(_: web.Request) -> web.Response:
        if cp.issuer is None:
            return web.json_response({"error": "mTLS is off (serve --insecure)"}, status=409)
        try:
            serial = await asyncio.to_thread(cp.issuer.rotate)
        except MeshgateError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response({"rotated": True, "intermediate_serial": f"{serial:x}"})

    app = web.Application(middlewares=[token_middleware(admin_token)])
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

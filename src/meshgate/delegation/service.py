"""The delegation endpoint: supervisors create, list and delete sub-agents through the gateway.

An agent calls `http://meshgate.internal/v1/sub-agents` through its own sidecar; the gateway
routes that only for agents whose policy allows delegation (`expand.SERVICE_RULE`), replaces
`x-meshgate-agent` with the SPIFFE ID of the caller's verified certificate, and injects a key
only gateways hold (`expand.KEY_HEADER`, an SDS secret). So this endpoint knows who asks from
the certificate, never from anything the agent set: a request without the key (not through a
gateway) is refused. Only the caller's own sub-agents can be created, listed or deleted.

Blocking work (the registry's store, signing a join token) runs in worker threads. A store that
does not answer (PostgreSQL down) is a 503 `store_unavailable`: nothing was created or deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshgate.delegation import names
from meshgate.delegation.expand import KEY_HEADER
from meshgate.delegation.registry import DelegationRegistry, Request, describe
from meshgate.delegation.rights import DelegationError, RuleGrant
from meshgate.delegation.stores import DelegationStoreError
from meshgate.durations import DurationError
from meshgate.http_listen import listen
from meshgate.identity.ca import IdentityError
from meshgate.identity.certs import parse_spiffe_id
from meshgate.identity.tokens import TokenAuthority
from meshgate.policy.delegation import ttl_seconds
from meshgate.policy.model import Delegation, PolicyModel, agent_spiffe_id

log = logging.getLogger(__name__)
AGENT_HEADER = "x-meshgate-agent"  # xds.allowlist.AGENT_HEADER (the gateway sets it)
MAX_BODY = 64 * 1024


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RuleDoc(_Doc):
    rule: Annotated[int, Field(ge=0)]
    methods: list[str] | None = None
    paths: list[str] | None = None
    tools: list[str] | None = None


class DelegationDoc(_Doc):
    maxSubAgents: Annotated[int, Field(ge=1)]
    maxTtl: str


class CreateDoc(_Doc):
    name: str
    ttl: str
    rules: list[RuleDoc]
    delegation: DelegationDoc | None = None


def parse_request(data: Any) -> Request:
    """The request a supervisor sent, or DelegationError saying what is wrong with it."""
    try:
        doc = CreateDoc.model_validate(data)
        deleg = (
            Delegation(doc.delegation.maxSubAgents, ttl_seconds(doc.delegation.maxTtl))
            if doc.delegation
            else None
        )
        ttl = ttl_seconds(doc.ttl, "ttl")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise DelegationError(f"{where}: {first['msg']}") from None
    except DurationError as exc:
        raise DelegationError(str(exc)) from None
    grants = tuple(
        RuleGrant(r.rule, tuple(r.methods or ()), tuple(r.paths or ()), tuple(r.tools or ()))
        for r in doc.rules
    )
    return Request(doc.name, ttl, grants, deleg)


class DelegationServer:
    """aiohttp on `host:port` (0 asks the OS); gateways reach it as the `meshgate.internal`
    destination. `served`: the model being served, sub-agents included; `poke`: make runtime
    inputs pick a change up now."""

    def __init__(
        self,
        registry: DelegationRegistry,
        served: Callable[[], PolicyModel | None],
        tokens: TokenAuthority | None,
        poke: Callable[[], None],
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.registry = registry
        self.served = served
        self.tokens = tokens
        self.poke = poke
        self.host = host
        self.port = port
        self._key = hashlib.sha256(registry.key.encode()).digest()
        self._runner: web.AppRunner | None = None
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/sub-agents", self.create)
        app.router.add_get("/v1/sub-agents", self.list)
        app.router.add_delete("/v1/sub-agents/{name}", self.delete)
        self.app = app

    async def start(self) -> None:
        self._runner, self.port = await listen(self.app, self.host, self.port, "delegation")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- who is asking ----------------------------------------------------------------------

    async def _caller(self, request: web.Request) -> tuple[str, PolicyModel]:
        given = request.headers.get(KEY_HEADER, "")
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self._key):
            raise _Refused(403, "not_through_gateway", "call this through your sidecar")
        model = await asyncio.to_thread(self.served)  # expands the policy: O(agents)
        if model is None:
            raise _Refused(503, "not_ready", "no policy is served yet")
        spiffe = request.headers.get(AGENT_HEADER, "")
        try:
            trust_domain, kind, name = parse_spiffe_id(spiffe)
        except IdentityError:
            raise _Refused(403, "no_identity", "the caller has no agent certificate") from None
        if kind != "agent" or trust_domain != model.mesh.trust_domain:
            raise _Refused(403, "no_identity", "the caller is not an agent of this mesh")
        return name, model

    # -- handlers ---------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        try:
            caller, model = await self._caller(request)
            try:
                body = await request.json()
            except ValueError:
                raise _Refused(400, "bad_request", "the body is not JSON") from None
            ask = parse_request(body)
            sub = await asyncio.to_thread(self.registry.create, caller, ask, model)
        except _Refused as r:
            return r.response()
        except DelegationStoreError as exc:
            return _unavailable(exc)
        except DelegationError as exc:
            log.info("delegation: refused a sub-agent for %s: %s", request.headers.get(
                AGENT_HEADER, "?"), exc)  # fmt: skip
            return _Refused(403, "delegation_refused", str(exc)).response()
        token = None
        if self.tokens is not None:
            tokens = self.tokens
            ttl = max(1, sub.expires_at - sub.created_at)
            # never valid past the delegation, however long signing took
            token, claims = await asyncio.to_thread(
                tokens.create, f"agent/{sub.name}", ttl, not_after=sub.expires_at
            )
            try:
                await asyncio.to_thread(self.registry.set_token, sub, claims.token_id)
            except DelegationStoreError as exc:  # it exists, but could not be revoked by id
                log.warning("delegation: %s: token id not recorded: %s", sub.name, exc)
        self.poke()
        log.info("delegation: %s created sub-agent %s until %s", caller, sub.name, sub.expires_at)
        out = describe(sub)
        out["spiffe_id"] = agent_spiffe_id(model.mesh.trust_domain, sub.name)
        out["join_token"] = token
        return web.json_response(out, status=201)

    async def list(self, request: web.Request) -> web.Response:
        try:
            caller, _ = await self._caller(request)
        except _Refused as r:
            return r.response()
        try:
            subs = await asyncio.to_thread(self.registry.children, caller)
        except DelegationStoreError as exc:
            return _unavailable(exc)
        return web.json_response({"agent": caller, "sub_agents": [describe(s) for s in subs]})

    async def delete(self, request: web.Request) -> web.Response:
        try:
            caller, _ = await self._caller(request)
            name = request.match_info["name"]
            if not names.is_label(name):
                raise _Refused(400, "bad_request", f"{name!r} is not a sub-agent name")
            gone = await asyncio.to_thread(self.registry.delete, caller, name)
        except _Refused as r:
            return r.response()
        except DelegationStoreError as exc:
            return _unavailable(exc)
        except DelegationError as exc:
            return _Refused(404, "not_found", str(exc)).response()
        if self.tokens is not None:
            for sub in gone:
                if sub.token_id:
                    try:
                        await asyncio.to_thread(self.tokens.revoke, sub.token_id)
                    except OSError as exc:  # read-only revocation list (a ConfigMap): the
                        # sub-agent is gone from every replica's config regardless
                        log.warning("delegation: token of %s not revoked: %s", sub.name, exc)
        self.poke()
        return web.json_response({"deleted": [s.name for s in gone]})


def _unavailable(exc: DelegationStoreError) -> web.Response:
    log.error("delegation: %s", exc)
    return _Refused(503, "store_unavailable", "the delegation store did not answer").response()


class _Refused(Exception):
    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason

    def response(self) -> web.Response:
        return web.json_response({"error": self.error, "reason": self.reason}, status=self.status)

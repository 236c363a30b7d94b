"""Authenticated xDS: every refusal is UNAUTHENTICATED with a reason, before any config."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import jwt
import pytest
from builders import AdsClient, ads_server, model
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshgate.controlplane.auth import TokenAuthenticator
from meshgate.identity.tokens import TokenAuthority, subject_allows
from meshgate.xds import types
from meshgate.xds.build import build_snapshots


def request(node_id: str) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node_id), type_url=types.CLUSTER)


async def attempt(
    tmp_path: Path, node_id: str, token: str | None
) -> discovery_pb2.DiscoveryResponse:
    authority = TokenAuthority(tmp_path)
    async with ads_server(TokenAuthenticator(authority)) as h:
        h.cache.set_snapshots(build_snapshots(model("v1")))
        meta = (("authorization", f"Bearer {token}"),) if token else ()
        c = AdsClient(h.address, metadata=meta)
        c.send(request(node_id))
        try:
            return await c.recv()
        finally:
            await c.close()


async def refused(tmp_path: Path, node_id: str, token: str | None) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await attempt(tmp_path, node_id, token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return err.value.details() or ""


async def test_valid_token_gets_config(tmp_path: Path) -> None:
    token, _ = TokenAuthority(tmp_path).create("gateway/gw1", 600)
    resp = await attempt(tmp_path, "gateway/gw1", token)
    assert resp.version_info and resp.resources


async def test_agent_token_covers_its_instances_only(tmp_path: Path) -> None:
    token, _ = TokenAuthority(tmp_path).create("agent/researcher", 600)
    assert (await attempt(tmp_path, "agent/researcher/pod-1", token)) is not None
    detail = await refused(tmp_path, "agent/coder/pod-1", token)
    assert detail == "token is for agent/researcher, not for node agent/coder/pod-1"
    assert not subject_allows("agent/research", "agent/researcher/x")
    assert not subject_allows("gateway/g", "gateway/g/x")


async def test_missing_token(tmp_path: Path) -> None:
    assert "join token is required" in await refused(tmp_path, "gateway/gw1", None)


async def test_forged_token(tmp_path: Path) -> None:
    other, _ = TokenAuthority(tmp_path / "elsewhere").create("gateway/gw1", 600)
    assert await refused(tmp_path, "gateway/gw1", other) == (
        "token signature is not from this control plane"
    )


async def test_expired_token(tmp_path: Path) -> None:
    authority = TokenAuthority(tmp_path)
    key = authority._key
    now = int(time.time())
    stale = jwt.encode(
        {
            "iss": "meshgate",
            "aud": "meshgate-xds",
            "sub": "gateway/gw1",
            "iat": now - 120,
            "exp": now - 60,
            "jti": "x",
        },
        key,
        algorithm="EdDSA",
    )
    assert await refused(tmp_path, "gateway/gw1", stale) == "token expired"


async def test_wrong_audience(tmp_path: Path) -> None:
    key = TokenAuthority(tmp_path)._key
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": "meshgate",
            "aud": "some-tool",
            "sub": "gateway/gw1",
            "iat": now,
            "exp": now + 60,
            "jti": "y",
        },
        key,
        algorithm="EdDSA",
    )
    assert "audience" in await refused(tmp_path, "gateway/gw1", token)


async def test_revoked_token(tmp_path: Path) -> None:
    authority = TokenAuthority(tmp_path)
    token, claims = authority.create("gateway/gw1", 600)
    authority.revoke(claims.token_id)
    assert await refused(tmp_path, "gateway/gw1", token) == (f"token {claims.token_id} was revoked")


def test_signing_key_is_private(tmp_path: Path) -> None:
    TokenAuthority(tmp_path)
    assert (tmp_path / "tokens" / "signing-key.pem").stat().st_mode & 0o777 == 0o600
    # loading again uses the same key: tokens survive a restart
    token, _ = TokenAuthority(tmp_path).create("gateway/a", 60)
    assert TokenAuthority(tmp_path).verify(token).subject == "gateway/a"


def test_a_sub_agents_token_holds_only_for_its_current_delegation(tmp_path: Path) -> None:
    """Deleted through another replica (whose revocation list this one never sees, or which
    is read-only) and re-created under the same name: the old holder's token, still unexpired,
    must not pass as the new sub-agent; the new one's token does."""
    from meshgate.controlplane.streams import StreamError
    from meshgate.delegation.registry import DelegationRegistry, Request
    from meshgate.delegation.rights import RuleGrant
    from meshgate.identity.tokens import new_token_id
    from meshgate.policy.model import AgentPolicy, Delegation, EgressRule

    base = model("v1")
    rule = EgressRule(base.destinations[0].name)
    sup = AgentPolicy("sup", "sup", (rule,), delegation=Delegation(2, 600))
    m = model("v1", base.destinations, agents=(sup,))
    authority = TokenAuthority(tmp_path)
    authenticate = TokenAuthenticator(authority)
    registry = DelegationRegistry(tmp_path, time.time)

    def delegate() -> str:
        token_id = new_token_id()
        registry.create("sup", Request("w", 300, (RuleGrant(0),)), m, token_id)
        return authority.create("agent/sup.w", 300, token_id=token_id)[0]

    def check(token: str) -> str:
        return authenticate("agent/sup.w/pod-1", {"authorization": f"Bearer {token}"}, "peer")

    old = delegate()
    with pytest.raises(StreamError, match="delegation is off here"):
        check(old)  # no registry bound: no sub-agent token passes
    authority.sub_agent_token = registry.token_of
    assert check(old) == "agent/sup.w"
    registry.delete("sup", "w")  # no revoke(): as on another replica
    with pytest.raises(StreamError, match=r"sub-agent sup\.w no longer exists"):
        check(old)
    new = delegate()
    with pytest.raises(StreamError, match=r"not the one issued for sub-agent sup\.w"):
        check(old)
    assert check(new) == "agent/sup.w"
    # a policy agent's token is not bound to anything
    assert authenticate(
        "agent/sup", {"authorization": f"Bearer {authority.create('agent/sup', 60)[0]}"}, "p"
    )


async def test_an_open_stream_of_a_deleted_sub_agent_gets_nothing_more(tmp_path: Path) -> None:
    """Authenticated at connect, the old holder's stream stays open: once the sub-agent is
    deleted (and its name delegated again), its next request or push ends it, before the
    new delegation's config (and certificate) reaches it."""
    from meshgate.delegation.expand import expand
    from meshgate.delegation.registry import DelegationRegistry, Request
    from meshgate.delegation.rights import RuleGrant
    from meshgate.identity.tokens import new_token_id
    from meshgate.policy.model import AgentPolicy, Delegation, EgressRule

    base = model("v1")
    rule = EgressRule(base.destinations[0].name)
    sup = AgentPolicy("sup", "sup", (rule,), delegation=Delegation(2, 600))
    m = model("v1", base.destinations, agents=(sup,))
    authority = TokenAuthority(tmp_path)
    registry = DelegationRegistry(tmp_path, time.time)
    authority.sub_agent_token = registry.token_of

    def delegate() -> str:
        token_id = new_token_id()
        registry.create("sup", Request("w", 300, (RuleGrant(0),)), m, token_id)
        return authority.create("agent/sup.w", 300, token_id=token_id)[0]

    def bearer(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    async with ads_server(TokenAuthenticator(authority)) as h:
        first = delegate()
        h.cache.set_snapshots(build_snapshots(expand(m, registry.current(m)).model))
        old = AdsClient(h.address, metadata=bearer(first))
        try:
            old.send(request("agent/sup.w/pod-1"))
            assert (await old.recv()).resources
            registry.delete("sup", "w")
            new = AdsClient(h.address, metadata=bearer(delegate()))
            old.send(request_for("agent/sup.w/pod-1", types.LISTENER))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await old.recv()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "not the one issued for sub-agent sup.w" in (err.value.details() or "")
        finally:
            await old.close()
        try:  # the new holder's stream: ended by the push that removes its config
            new.send(request("agent/sup.w/pod-2"))
            assert (await new.recv()).resources
            registry.delete("sup", "w")
            h.cache.set_snapshots(build_snapshots(expand(m, registry.current(m)).model))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await new.recv()
            assert "sub-agent sup.w no longer exists" in (err.value.details() or "")
        finally:
            await new.close()


def request_for(node_id: str, type_url: str) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node_id), type_url=type_url)


async def test_an_open_access_log_stream_of_a_deleted_sub_agent_logs_nothing_more(
    tmp_path: Path,
) -> None:
    """The same for its sidecar's access-log stream: once the sub-agent is deleted, its next
    message ends the stream, unauthenticated, before anything in it is decoded."""
    import asyncio

    from envoy.service.accesslog.v3 import als_pb2

    from meshgate.audit.spool import METHOD
    from meshgate.audit.sqlite_store import SqliteAuditStore
    from meshgate.controlplane.access_log import AuditIngest, AuditWriter
    from meshgate.delegation.registry import DelegationRegistry, Request
    from meshgate.delegation.rights import RuleGrant
    from meshgate.identity.tokens import new_token_id
    from meshgate.policy.model import AgentPolicy, Delegation, EgressRule

    base = model("v1")
    sup = AgentPolicy("sup", "sup", (EgressRule(base.destinations[0].name),))
    sup = AgentPolicy("sup", "sup", sup.rules, delegation=Delegation(2, 600))
    m = model("v1", base.destinations, agents=(sup,))
    authority = TokenAuthority(tmp_path)
    registry = DelegationRegistry(tmp_path, time.time)
    authority.sub_agent_token = registry.token_of
    token_id = new_token_id()
    registry.create("sup", Request("w", 300, (RuleGrant(0),)), m, token_id)
    token = authority.create("agent/sup.w", 300, token_id=token_id)[0]

    store = SqliteAuditStore(tmp_path / "audit.db")
    ingest = AuditIngest(AuditWriter(lambda: store), authenticate=TokenAuthenticator(authority))
    await ingest.start()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ingest.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outbox: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def messages():  # type: ignore[no-untyped-def]
        while (raw := await outbox.get()) is not None:
            yield raw

    empty = als_pb2.StreamAccessLogsMessage()
    empty.identifier.node.id = "agent/sup.w/pod-1"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary(
                METHOD,
                request_serializer=lambda raw: raw,
                response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
            )(messages(), metadata=(("authorization", f"Bearer {token}"),))
            for _ in range(2):  # authenticated, and still its delegation's
                await outbox.put(empty.SerializeToString())
            await asyncio.sleep(0.5)
            assert not call.done()
            registry.delete("sup", "w")
            # refused on the ingest loop at the next message; the call ends at the one after
            # (the xDS loop notices a refusal when it hands a message over)
            for _ in range(2):
                await outbox.put(empty.SerializeToString())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(call, 10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "sub-agent sup.w" in (err.value.details() or "")
    finally:
        await server.stop(grace=0)
        await ingest.stop()

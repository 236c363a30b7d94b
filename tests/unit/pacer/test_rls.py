"""The rate-limit service over gRPC: descriptors, failure modes, what Envoy turns into headers."""

from __future__ import annotations

import stat

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from pacer_twins import FlakyStore

from meshgate.pacer.rls import _rate_limit
from meshgate.pacer.service import Pacer
from meshgate.pacing import spec

Code = rls_pb2.RateLimitResponse.Code
Unit = rls_pb2.RateLimitResponse.RateLimit.Unit


def descriptor(entries: list[tuple[str, str]]) -> ratelimit_pb2.RateLimitDescriptor:
    return ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )


def limit(
    key: str = "a/r0", n: int = 2, per: int = 60, failure: str = "open"
) -> list[tuple[str, str]]:
    return spec.descriptor_entries(spec.GlobalLimit(key, n, per, failure))  # type: ignore[arg-type]


async def call(
    channel: grpc.aio.Channel, *descriptors: list[tuple[str, str]], domain: str = spec.RLS_DOMAIN
) -> rls_pb2.RateLimitResponse:
    method = channel.unary_unary(
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        request_serializer=rls_pb2.RateLimitRequest.SerializeToString,
        response_deserializer=rls_pb2.RateLimitResponse.FromString,
    )
    request = rls_pb2.RateLimitRequest(
        domain=domain, descriptors=[descriptor(d) for d in descriptors]
    )
    return await method(request, timeout=5)  # type: ignore[no-any-return]


def test_the_socket_is_owner_only(pacer: Pacer) -> None:
    assert stat.S_IMODE(pacer.socket.stat().st_mode) == 0o600


async def test_counts_down_then_refuses_with_retry_after(channel: grpc.aio.Channel) -> None:
    first = await call(channel, limit())
    assert first.overall_code == Code.OK
    (status,) = first.statuses
    assert status.current_limit.requests_per_unit == 2 and status.current_limit.unit == Unit.MINUTE
    assert status.limit_remaining == 1
    assert not first.response_headers_to_add
    await call(channel, limit())
    refused = await call(channel, limit())
    assert refused.overall_code == Code.OVER_LIMIT
    assert refused.statuses[0].code == Code.OVER_LIMIT and refused.statuses[0].limit_remaining == 0
    (header,) = refused.response_headers_to_add
    assert header.key == "retry-after" and 1 <= int(header.value) <= 30


async def test_one_descriptor_over_refuses_the_request(channel: grpc.aio.Channel) -> None:
    await call(channel, limit("x", 1))
    both = await call(channel, limit("x", 1), limit("y", 5))
    assert both.overall_code == Code.OVER_LIMIT
    assert [s.code for s in both.statuses] == [Code.OVER_LIMIT, Code.OK]


@pytest.mark.parametrize(
    "entries",
    [
        [("key", "a"), ("limit", "0/60"), ("failure", "open")],
        [("key", "a"), ("limit", "2/60")],
        [("generic_key", "x")],
        [("key", "a"), ("limit", "2/60"), ("failure", "maybe")],
    ],
)
async def test_a_descriptor_it_cannot_read_is_refused(
    channel: grpc.aio.Channel, entries: list[tuple[str, str]]
) -> None:
    assert (await call(channel, entries)).overall_code == Code.OVER_LIMIT


async def test_another_domain_is_refused(channel: grpc.aio.Channel) -> None:
    assert (await call(channel, limit(), domain="other")).overall_code == Code.OVER_LIMIT


async def test_store_down_open_allows_closed_fails_the_call(
    channel: grpc.aio.Channel, store: FlakyStore
) -> None:
    store.down = True
    assert (await call(channel, limit(failure="open"))).overall_code == Code.OK
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(channel, limit(failure="closed"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_slow_store_is_a_down_store(channel: grpc.aio.Channel, store: FlakyStore) -> None:
    store.delay = 2.0  # beyond the pacer's bound on one hit (service.RLS_TIMEOUT_S)
    assert (await call(channel, limit(failure="open"))).overall_code == Code.OK
    with pytest.raises(grpc.aio.AioRpcError):
        await call(channel, limit(failure="closed"))


async def test_decisions_are_counted(channel: grpc.aio.Channel, pacer: Pacer) -> None:
    await call(channel, limit("m", 1))
    await call(channel, limit("m", 1))
    text = pacer.metrics.exposition().decode()
    assert 'meshgate_pacer_decisions_total{decision="ok",kind="rls"} 1.0' in text
    assert 'meshgate_pacer_decisions_total{decision="over_limit",kind="rls"} 1.0' in text


@pytest.mark.parametrize(
    ("requests", "per", "expect"),
    [
        (600, 60, (600, Unit.MINUTE)),
        (100, 120, (50, Unit.MINUTE)),
        (5, 1, (5, Unit.SECOND)),
        (24, 86400, (24, Unit.DAY)),
        (10, 3600, (10, Unit.HOUR)),
        (7, 90, (1, Unit.SECOND)),  # no whole unit: per second, rounded up
    ],
)
def test_limits_in_envoys_units(requests: int, per: int, expect: tuple[int, int]) -> None:
    got = _rate_limit("k", requests, per)
    assert (got.requests_per_unit, got.unit) == expect

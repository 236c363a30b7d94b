"""The control plane's embedded LimitStore, served to gateways over gRPC (`RemoteStore`).

Four unary methods of `meshgate.limits.v1.LimitStore` (Hit, Reserve, Settle, Budgets), JSON
messages (`store_wire`), added as one more generic handler on the control plane's xDS server.

Trust: any caller that reaches this handler can spend and read every budget, so it must only be
served on a port whose callers the server authenticates (the xDS port with mTLS, gateways'
certificates). `authorize(metadata, peer)`, when given, runs before every call and refuses the
call (PERMISSION_DENIED) by raising; use it to check a join token as the other xDS services do.

Errors: bad input -> INVALID_ARGUMENT; the backing store unavailable (its own Redis down) ->
UNAVAILABLE, which the client turns into StoreUnavailable.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from meshgate.pacing import store_wire as wire
from meshgate.pacing.store import LimitStore, StoreUnavailable

log = logging.getLogger(__name__)

Authorize = Callable[[dict[str, str], str], None]
Method = Callable[[dict[str, Any]], Awaitable[bytes]]


def store_service_handler(
    store: LimitStore, *, authorize: Authorize | None = None
) -> grpc.GenericRpcHandler[Any, Any]:
    async def hit(data: dict[str, Any]) -> bytes:
        return wire.decision(await store.hit(*wire.parse_hit_request(data)))

    async def reserve(data: dict[str, Any]) -> bytes:
        return wire.reservation(await store.reserve(*wire.parse_reserve_request(data)))

    async def settle(data: dict[str, Any]) -> bytes:
        await store.settle(*wire.parse_settle_request(data))
        return b"{}"

    async def budgets(data: dict[str, Any]) -> bytes:
        return wire.states(await store.budgets(wire.parse_budgets_request(data)))

    def unary(method: Method) -> grpc.RpcMethodHandler[Any, Any]:
        async def serve(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            if authorize is not None:
                metadata = {
                    k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)
                }
                try:
                    authorize(metadata, context.peer())
                except Exception as e:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
            try:
                return await method(wire.load(request))
            except StoreUnavailable as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            except (ValueError, KeyError, TypeError) as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {e}")
            raise AssertionError("unreachable: abort raises")

        return grpc.unary_unary_rpc_method_handler(serve)  # raw bytes both ways

    return grpc.method_handlers_generic_handler(
        wire.SERVICE,
        {
            wire.HIT: unary(hit),
            wire.RESERVE: unary(reserve),
            wire.SETTLE: unary(settle),
            wire.BUDGETS: unary(budgets),
        },
    )

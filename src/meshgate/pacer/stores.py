"""Which limit store a gateway's pacer counts in: Redis shared by every replica when given
(`--limit-store redis://...`), else the control plane's embedded store over its xDS port
(`RemoteStore`, with the gateway's join token and the xDS TLS bundle)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc

from meshgate.pacing.open import STORE_MAX_IN_FLIGHT, STORE_TIMEOUT_S
from meshgate.pacing.remote_store import RemoteStore
from meshgate.pacing.store import (
    BudgetState,
    Charge,
    LimitStore,
    RateDecision,
    Reservation,
)

log = logging.getLogger(__name__)

StoreFactory = Callable[[], LimitStore]
TOKEN_REFRESH_S = 3600.0


def store_factory(
    limit_store: str | None,
    *,
    password_file: Path | None,
    control_plane: str,
    ca_file: str | None,
    metadata: Sequence[tuple[str, str]],
    refresh_metadata: Callable[[], Sequence[tuple[str, str]]] | None = None,
) -> StoreFactory:
    """Runs on the pacer's loop: async clients bind to the loop they are made on."""
    if limit_store is not None:

        def redis() -> LimitStore:
            from meshgate.pacing.open import open_limit_store

            return open_limit_store(limit_store, password_file)

        return redis

    def remote() -> LimitStore:
        # the control plane serves its store on the xDS port to gateway tokens only
        # (controlplane/auth.GatewaysOnly); the token is renewed now and then (it expires, a
        # --token-file is rotated)
        channel = _channel(control_plane, ca_file)
        # one more hop than Redis (and Python gRPC on both ends): a longer bound
        store = RemoteStore(
            channel,
            metadata=metadata,
            timeout_s=2 * STORE_TIMEOUT_S,
            max_in_flight=STORE_MAX_IN_FLIGHT,
        )
        return _ChannelStore(store, channel, refresh_metadata)

    return remote


def _channel(target: str, ca_file: str | None) -> grpc.aio.Channel:
    if ca_file is None:
        return grpc.aio.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
    return grpc.aio.secure_channel(target, credentials)


class _ChannelStore:
    """A RemoteStore and the channel it was given (closed together), its join token renewed
    every `TOKEN_REFRESH_S` off the loop (minting or reading a token touches files)."""

    def __init__(
        self,
        store: RemoteStore,
        channel: grpc.aio.Channel,
        refresh: Callable[[], Sequence[tuple[str, str]]] | None,
    ) -> None:
        self._store = store
        self._channel = channel
        self._refresh = refresh
        self._next_refresh = time.monotonic() + TOKEN_REFRESH_S
        self._refreshing: asyncio.Task[None] | None = None

    def _maybe_refresh(self) -> None:
        if self._refresh is None or time.monotonic() < self._next_refresh:
            return
        self._next_refresh = time.monotonic() + TOKEN_REFRESH_S
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        assert self._refresh is not None
        try:
            self._store.metadata = tuple(await asyncio.to_thread(self._refresh))
        except Exception as exc:  # keep the old token; the next refresh tries again
            log.warning("pacer: cannot renew the join token: %s", exc)

    async def hit(self, key: str, requests: int, per_seconds: int, want: int = 1) -> RateDecision:
        self._maybe_refresh()
        return await self._store.hit(key, requests, per_seconds, want)

    async def reserve(
        self, reservation: str, charges: Sequence[Charge], ttl_s: float
    ) -> Reservation:
        self._maybe_refresh()
        return await self._store.reserve(reservation, charges, ttl_s)

    async def settle(self, reservation: str, actual: Mapping[str, int]) -> None:
        self._maybe_refresh()
        await self._store.settle(reservation, actual)

    async def budgets(self, prefix: str = "") -> list[BudgetState]:
        return await self._store.budgets(prefix)

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        await self._store.close()
        await self._channel.close(None)

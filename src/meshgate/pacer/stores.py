"""Which limit store a gateway's pacer counts in: Redis shared by every replica when given
(`--limit-store redis://...`), else the control plane's embedded store over its xDS port
(`RemoteStore`, with the gateway's join token and the xDS TLS bundle)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc

from meshgate.pacing.store import (
    BudgetState,
    Charge,
    LimitStore,
    RateDecision,
    Reservation,
)

StoreFactory = Callable[[], LimitStore]


def store_factory(
    limit_store: str | None,
    *,
    password_file: Path | None,
    control_plane: str,
    ca_file: str | None,
    metadata: Sequence[tuple[str, str]],
) -> StoreFactory:
    """Runs on the pacer's loop: async clients bind to the loop they are made on."""
    if limit_store is not None:

        def redis() -> LimitStore:
            from meshgate.pacing.open import open_limit_store

            return open_limit_store(limit_store, password_file)

        return redis

    def remote() -> LimitStore:
        # the control plane serves its store on the xDS port to gateway tokens only
        # (controlplane/auth.GatewaysOnly). The token is read once: a rotated --token-file
        # reaches the pacer when the gateway restarts.
        from meshgate.pacing.remote_store import RemoteStore

        channel = _channel(control_plane, ca_file)
        return _ChannelStore(RemoteStore(channel, metadata=metadata), channel)

    return remote


def _channel(target: str, ca_file: str | None) -> grpc.aio.Channel:
    if ca_file is None:
        return grpc.aio.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
    return grpc.aio.secure_channel(target, credentials)


class _ChannelStore:
    """A RemoteStore and the channel it was given: closed together."""

    def __init__(self, store: LimitStore, channel: grpc.aio.Channel) -> None:
        self._store = store
        self._channel = channel

    async def hit(self, key: str, requests: int, per_seconds: int) -> RateDecision:
        return await self._store.hit(key, requests, per_seconds)

    async def reserve(
        self, reservation: str, charges: Sequence[Charge], ttl_s: float
    ) -> Reservation:
        return await self._store.reserve(reservation, charges, ttl_s)

    async def settle(self, reservation: str, actual: Mapping[str, int]) -> None:
        await self._store.settle(reservation, actual)

    async def budgets(self, prefix: str = "") -> list[BudgetState]:
        return await self._store.budgets(prefix)

    async def close(self) -> None:
        await self._store.close()
        await self._channel.close(None)

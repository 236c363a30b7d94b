"""`meshgate gateway --register-consul`: the gateway as a Consul service, so applications find it.

Registered with the local Consul agent (`PUT /v1/agent/service/register`) with an HTTP check
on Envoy's admin `/ready`, so Consul reports it healthy only once Envoy has its configuration;
deregistered (`PUT /v1/agent/service/deregister/<id>`) on a clean stop, before Envoy exits.
A Consul that is down at start is retried with backoff (`meshgate.retry`; one warning per
outage); the gateway runs meanwhile. The token comes from a file and is never logged. Consul is
reached through `meshgate.adapters.consul`, the client the catalogue watch uses too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from meshgate.adapters.consul import (
    ConsulClient,
    PyConsulClient,
    ServiceRegistration,
    describe_error,
)
from meshgate.policy.model import ConsulConfig
from meshgate.retry import Backoff, Outage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    consul: str  # http(s)://host:port of the Consul agent
    service_id: str
    service: str
    address: str  # where applications reach the gateway listener
    port: int
    check_url: str  # Envoy's admin /ready
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    tags: tuple[str, ...] = ("meshgate", "egress")
    meta: tuple[tuple[str, str], ...] = ()
    check_interval: str = "10s"
    deregister_after: str = "1m"  # a gateway that died uncleanly leaves the catalogue too

    @property
    def consul_config(self) -> ConsulConfig:
        return ConsulConfig(self.consul, ca_file=self.ca_file)

    @property
    def service_registration(self) -> ServiceRegistration:
        return ServiceRegistration(
            name=self.service,
            service_id=self.service_id,
            address=self.address,
            port=self.port,
            check_url=self.check_url,
            tags=self.tags,
            meta=self.meta,
            check_interval=self.check_interval,
            deregister_after=self.deregister_after,
        )


def _py_consul(config: ConsulConfig) -> ConsulClient:
    return PyConsulClient(config, timeout=10, needed_by="--register-consul needs")


class ConsulRegistrar:
    """Registers once (retrying until it works), deregisters on `stop`."""

    def __init__(
        self,
        reg: Registration,
        backoff_max: float = 30.0,
        client_factory: Callable[[ConsulConfig], ConsulClient] = _py_consul,
        backoff_base: float = 0.5,
    ) -> None:
        self.reg = reg
        self.backoff = Backoff(backoff_base, backoff_max)
        self.registered = False
        self._client_factory = client_factory
        self._client: ConsulClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._outage = Outage(log)

    def start(self) -> None:
        self._client = self._client_factory(self.reg.consul_config)
        self._task = asyncio.create_task(self._register_until_done(), name="consul-register")

    async def wait_registered(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _register_until_done(self) -> None:
        client, reg = self._client, self.reg
        assert client is not None
        await self.backoff.until_success(
            lambda: client.register(reg.service_registration, token=reg.token), self._failed
        )
        self.registered = True
        log.info(
            "consul: registered %s as %s at %s:%d",
            reg.service_id,
            reg.service,
            reg.address,
            reg.port,
        )

    def _failed(self, exc: BaseException, delay: float) -> None:
        message = describe_error(exc, self.reg.token)
        self._outage.failed(
            "consul: registering %s failed (%s); retrying in %.1fs",
            self.reg.service_id,
            message,
            delay,
        )

    async def stop(self) -> None:
        """Stop retrying; deregister if registered (a clean stop leaves no stale instance)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._client is None:
            return
        try:
            if self.registered:
                await self._client.deregister(self.reg.service_id, token=self.reg.token)
                self.registered = False
                log.info("consul: deregistered %s", self.reg.service_id)
        except Exception as exc:
            message = describe_error(exc, self.reg.token)
            log.warning("consul: deregistering %s failed (%s)", self.reg.service_id, message)
        finally:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

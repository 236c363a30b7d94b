"""`meshgate gateway --register-consul`: the gateway as a Consul service, so applications find it.

Registered with the local Consul agent (`PUT /v1/agent/service/register`) with an HTTP check
on Envoy's admin `/ready`, so Consul reports it healthy only once Envoy has its configuration;
deregistered (`PUT /v1/agent/service/deregister/<id>`) on a clean stop, before Envoy exits.
A Consul that is down at start is retried with backoff; the gateway runs meanwhile. The token
comes from a file and is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

from meshgate.errors import ConfigError
from meshgate.policy.syntax import split_consul_address

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


def _client(reg: Registration) -> Any:
    try:
        import consul.aio
    except ImportError:
        raise ConfigError("--register-consul needs: pip install 'meshgate[consul]'") from None
    scheme, host, port = split_consul_address(reg.consul)
    with warnings.catch_warnings():  # py-consul passes aiohttp arguments it has deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        client = consul.aio.Consul(
            host=host, port=port, scheme=scheme, verify=reg.ca_file or True, connections_timeout=10
        )
    client.token = None  # ours only, never CONSUL_HTTP_TOKEN by accident
    return client


class ConsulRegistrar:
    """Registers once (retrying until it works), deregisters on `stop`."""

    def __init__(self, reg: Registration, backoff_max: float = 30.0) -> None:
        self.reg = reg
        self.backoff_max = backoff_max
        self.registered = False
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._client = _client(self.reg)
        self._task = asyncio.create_task(self._register_until_done(), name="consul-register")

    async def wait_registered(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _register_until_done(self) -> None:
        from consul import Check

        reg = self.reg
        check = Check.http(
            reg.check_url, reg.check_interval, timeout="2s", deregister=reg.deregister_after
        )
        delay = 0.5
        while True:
            try:
                await self._client.agent.service.register(
                    reg.service,
                    service_id=reg.service_id,
                    address=reg.address,
                    port=reg.port,
                    tags=list(reg.tags),
                    meta=dict(reg.meta),
                    check=check,
                    token=reg.token,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                message = _scrub(f"{type(exc).__name__}: {exc}", reg.token)
                log.warning("consul: registering %s failed (%s); retrying", reg.service_id, message)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self.backoff_max)
                continue
            self.registered = True
            log.info(
                "consul: registered %s as %s at %s:%d",
                reg.service_id,
                reg.service,
                reg.address,
                reg.port,
            )
            return

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
                await self._client.agent.service.deregister(
                    self.reg.service_id, token=self.reg.token
                )
                self.registered = False
                log.info("consul: deregistered %s", self.reg.service_id)
        except Exception as exc:
            message = _scrub(f"{type(exc).__name__}: {exc}", self.reg.token)
            log.warning("consul: deregistering %s failed (%s)", self.reg.service_id, message)
        finally:
            with contextlib.suppress(Exception):
                await self._client.http.close()
            self._client = None


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "<token>")
    return " ".join(text.split())[:300]

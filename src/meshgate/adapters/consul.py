"""Consul's HTTP API as meshgate uses it: health blocking queries, agent (de)registration.

One client serves both the catalogue watch (control plane) and gateway registration
(`meshgate gateway --register-consul`): built the same way from a `ConsulConfig`, given the ACL
token per call (never CONSUL_HTTP_TOKEN from the environment), and with the same scrubbing of
the token out of error text. `InMemoryConsul` is its twin for tests and local runs.

Failures are `ConsulError` (Consul answered with an error; `ACLPermissionDenied` for a refused
token), `OSError` (unreachable, TLS refused) or `TimeoutError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshgate.errors import ConfigError
from meshgate.policy.model import ConsulConfig
from meshgate.policy.syntax import split_consul_address

HealthEntry = dict[str, Any]  # one entry of /v1/health/service/<name>, as Consul sends it


class ConsulError(Exception):
    """Consul answered, with an error."""


class ACLPermissionDenied(ConsulError):
    """The ACL token was missing or refused."""


@dataclass(frozen=True)
class ServiceRegistration:
    """An agent service with an HTTP health check (`PUT /v1/agent/service/register`)."""

    name: str
    service_id: str
    address: str
    port: int
    check_url: str
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    check_interval: str = "10s"
    check_timeout: str = "2s"
    deregister_after: str = "1m"


class ConsulClient(Protocol):
    """The part of Consul meshgate needs."""

    async def health_service(
        self,
        service: str,
        *,
        index: str | None = None,
        wait: float | None = None,
        passing: bool = True,
        tag: str | None = None,
        token: str | None = None,
    ) -> tuple[str, list[HealthEntry]]:
        """Instances of `service` and Consul's index; with `index`, blocks up to `wait` seconds
        until the index moves past it."""
        ...

    async def register(self, service: ServiceRegistration, token: str | None = None) -> None: ...

    async def deregister(self, service_id: str, token: str | None = None) -> bool:
        """False when the agent did not know `service_id`."""
        ...

    async def close(self) -> None: ...


def scrub(text: str, token: str | None) -> str:
    """An error message fit for logs and status: one line, short, never the token."""
    if token:
        text = text.replace(token, "<token>")
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def describe_error(exc: BaseException, token: str | None) -> str:
    return scrub(f"{type(exc).__name__}: {exc}", token)


class PyConsulClient:
    """`ConsulClient` over py-consul's asyncio client."""

    def __init__(self, config: ConsulConfig, *, timeout: float, needed_by: str) -> None:
        """`timeout`: per request, so longer than any blocking query's wait; `needed_by` names
        the feature in the one-line error when py-consul is not installed."""
        try:
            import consul
            import consul.aio
        except ImportError:
            raise ConfigError(f"{needed_by}: pip install 'meshgate[consul]'") from None
        self._consul = consul
        scheme, host, port = split_consul_address(config.address)
        with warnings.catch_warnings():  # py-consul passes aiohttp arguments it has deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            self._client: Any = consul.aio.Consul(
                host=host,
                port=port,
                scheme=scheme,
                verify=config.ca_file or True,
                dc=config.datacenter,
                connections_timeout=timeout,
            )
        self._client.token = None  # ours only, never CONSUL_HTTP_TOKEN by accident

    async def health_service(
        self,
        service: str,
        *,
        index: str | None = None,
        wait: float | None = None,
        passing: bool = True,
        tag: str | None = None,
        token: str | None = None,
    ) -> tuple[str, list[HealthEntry]]:
        with self._translated(token):
            new_index, entries = await self._client.health.service(
                service,
                index=index,
                wait=f"{round(wait * 1000)}ms" if index and wait is not None else None,
                passing=passing,
                tag=tag,
                token=token,
            )
        return str(new_index), list(entries or [])

    async def register(self, service: ServiceRegistration, token: str | None = None) -> None:
        check = self._consul.Check.http(
            service.check_url,
            service.check_interval,
            timeout=service.check_timeout,
            deregister=service.deregister_after,
        )
        with self._translated(token):
            await self._client.agent.service.register(
                service.name,
                service_id=service.service_id,
                address=service.address,
                port=service.port,
                tags=list(service.tags),
                meta=dict(service.meta),
                check=check,
                token=token,
            )

    async def deregister(self, service_id: str, token: str | None = None) -> bool:
        with self._translated(token):
            return bool(await self._client.agent.service.deregister(service_id, token=token))

    async def close(self) -> None:
        await self._client.http.close()

    @contextlib.contextmanager
    def _translated(self, token: str | None) -> Iterator[None]:
        """py-consul's exceptions -> ours, with the token scrubbed from their text."""
        try:
            yield
        except self._consul.ACLPermissionDenied as exc:
            raise ACLPermissionDenied(scrub(str(exc), token)) from None
        except self._consul.ConsulException as exc:
            raise ConsulError(scrub(str(exc), token)) from None


@dataclass
class _Instance:
    service: str
    instance_id: str
    address: str
    port: int
    tags: tuple[str, ...]
    passing: bool


@dataclass
class InMemoryConsul:
    """A `ConsulClient` twin: a catalogue in memory, with blocking queries and ACLs.

    Lives on one event loop. `token`: when set, calls without it get `ACLPermissionDenied`.
    `set_failing(message)` makes every call (blocked ones at once) fail with `ConsulError`."""

    token: str | None = None
    failing: str | None = None
    registered: dict[str, ServiceRegistration] = field(default_factory=dict)
    index: int = 10  # the raft index: moves on every write
    _services: dict[str, dict[str, _Instance]] = field(default_factory=dict)
    _service_index: dict[str, int] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    # -- controls ---------------------------------------------------------------------------

    def set_instance(
        self,
        service: str,
        instance_id: str,
        port: int,
        address: str = "127.0.0.1",
        tags: tuple[str, ...] = (),
        passing: bool = True,
    ) -> None:
        inst = _Instance(service, instance_id, address, port, tags, passing)
        self._services.setdefault(service, {})[instance_id] = inst
        self._bump(service)

    def remove_instance(self, service: str, instance_id: str) -> None:
        self._services.get(service, {}).pop(instance_id, None)
        self._bump(service)

    def set_passing(self, service: str, instance_id: str, passing: bool) -> None:
        self._services[service][instance_id].passing = passing
        self._bump(service)

    def set_failing(self, message: str | None) -> None:
        self.failing = message
        self._wake()

    def _bump(self, service: str) -> None:
        self.index += 1
        self._service_index[service] = self.index
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _check(self, token: str | None) -> None:
        if self.failing is not None:
            raise ConsulError(self.failing)
        if self.token is not None and token != self.token:
            raise ACLPermissionDenied("ACL not found")

    # -- ConsulClient -----------------------------------------------------------------------

    async def health_service(
        self,
        service: str,
        *,
        index: str | None = None,
        wait: float | None = None,
        passing: bool = True,
        tag: str | None = None,
        token: str | None = None,
    ) -> tuple[str, list[HealthEntry]]:
        self._check(token)
        wanted = int(index) if index else 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (300.0 if wait is None else wait)
        while wanted and self._service_index.get(service, 1) <= wanted:
            left = deadline - loop.time()
            if left <= 0:
                break
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                break
            self._check(token)
        entries = [
            _entry(inst)
            for inst in sorted(
                self._services.get(service, {}).values(), key=lambda i: i.instance_id
            )
            if (inst.passing or not passing) and (tag is None or tag in inst.tags)
        ]
        return str(self._service_index.get(service, 1)), entries

    async def register(self, service: ServiceRegistration, token: str | None = None) -> None:
        self._check(token)
        self.registered[service.service_id] = service
        self.index += 1

    async def deregister(self, service_id: str, token: str | None = None) -> bool:
        self._check(token)
        found = self.registered.pop(service_id, None) is not None
        self.index += found
        return found

    async def close(self) -> None:
        """Nothing to release (the twin may be handed to several users in turn)."""


def _entry(inst: _Instance) -> HealthEntry:
    status = "passing" if inst.passing else "critical"
    return {
        "Node": {"Node": f"node-{inst.instance_id}", "Address": "10.255.0.1"},
        "Service": {
            "ID": inst.instance_id,
            "Service": inst.service,
            "Tags": list(inst.tags),
            "Address": inst.address,
            "Port": inst.port,
        },
        "Checks": [
            {"CheckID": "serfHealth", "Status": "passing"},
            {"CheckID": f"service:{inst.instance_id}", "Status": status},
        ],
    }

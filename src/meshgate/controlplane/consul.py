"""Consul catalogue watcher: healthy instances of the services Consul-backed destinations name.

One task per watched service (name, tag, passingOnly) runs blocking queries on
`/v1/health/service/<name>` (`index` + `wait`), through py-consul's asyncio client so a watch
that policy no longer needs is cancelled at once. An answer with different instances calls
`on_change`; the control plane then rebuilds the gateway snapshot, where only that
destination's ClusterLoadAssignment changes. Errors back off (`meshgate.retry`) and keep the
last known instances, so an unreachable Consul never takes traffic away. The ACL token is read
through the mesh's secret provider before each query and is never logged or reported. Consul
itself is reached through `meshgate.adapters.consul` (the same client gateway registration uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshgate.adapters.consul import ConsulClient, HealthEntry, PyConsulClient, describe_error
from meshgate.controlplane.secrets import SecretProvider
from meshgate.errors import ConfigError
from meshgate.policy.model import ConsulConfig, ConsulService, PolicyModel
from meshgate.retry import Backoff

log = logging.getLogger(__name__)

Instance = tuple[str, int]  # (IP, port)


@dataclass(frozen=True)
class WatchSettings:
    """Timing of the watches; tests shorten them."""

    wait_seconds: float = 30.0  # how long Consul may hold a blocking query
    backoff_base: float = 0.25  # first retry delay after an error, seconds
    backoff_max: float = 15.0
    min_interval: float = 0.05  # floor between queries whose index did not move


@dataclass
class ServiceStatus:
    """What `meshgate status` shows for one watched service."""

    service: ConsulService
    instances: tuple[Instance, ...] | None = None  # None: Consul has not answered yet
    index: str | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    last_success_at: str | None = None
    skipped: int = 0  # instances without an IP address (EDS needs IPs)

    def to_json(self, destinations: list[str]) -> dict[str, Any]:
        return {
            "service": self.service.service,
            "tag": self.service.tag,
            "passing_only": self.service.passing_only,
            "destinations": destinations,
            "instances": None if self.instances is None else len(self.instances),
            "addresses": [f"{h}:{p}" for h, p in self.instances or ()],
            "skipped_non_ip": self.skipped,
            "index": self.index,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_success_at": self.last_success_at,
        }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def instances_of(entries: Any) -> tuple[tuple[Instance, ...], int]:
    """Health entries -> sorted unique (IP, port), and how many had no IP address.

    The service address wins; Consul leaves it empty when the instance uses its node's."""
    found: set[Instance] = set()
    skipped = 0
    for entry in entries or []:
        service = entry.get("Service") or {}
        node = entry.get("Node") or {}
        host = service.get("Address") or node.get("Address") or ""
        port = service.get("Port")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            skipped += 1
            continue
        if isinstance(port, int) and 0 < port < 65536:
            found.add((str(ip), port))
        else:
            skipped += 1
    return tuple(sorted(found)), skipped


@dataclass(frozen=True)
class _ClientKey:
    config: ConsulConfig
    provider: str  # the secret provider's description: a new one means re-reading the token


class ConsulCatalog:
    """Watches the services of the current policy; instances are read by the snapshot builder.

    `configure` runs on the event loop; `endpoints` may be called from worker threads.
    `client_factory`: how a Consul client is made for the Mesh's settings (tests pass
    `InMemoryConsul`); by default py-consul's."""

    def __init__(
        self,
        on_change: Callable[[], None],
        settings: WatchSettings | None = None,
        client_factory: Callable[[ConsulConfig], ConsulClient] | None = None,
    ) -> None:
        self.on_change = on_change
        self.settings = settings or WatchSettings()
        self._backoff = Backoff(self.settings.backoff_base, self.settings.backoff_max)
        self._client_factory = client_factory or self._py_consul
        self._lock = threading.Lock()
        self._status: dict[ConsulService, ServiceStatus] = {}
        self._tasks: dict[ConsulService, asyncio.Task[None]] = {}
        self._destinations: dict[ConsulService, list[str]] = {}
        self._key: _ClientKey | None = None
        self._client: ConsulClient | None = None
        self._client_error: str | None = None
        self._provider: SecretProvider | None = None

    # -- policy side -----------------------------------------------------------------------------

    async def configure(self, model: PolicyModel, provider: SecretProvider) -> None:
        """Watch exactly the services `model` names: new ones start, dropped ones stop,
        unchanged ones keep their watch (and index). A changed Consul address, datacenter,
        token secret or secret provider restarts every watch with a new client."""
        wanted: dict[ConsulService, list[str]] = {}
        for d in model.destinations:
            if d.consul is not None:
                wanted.setdefault(d.consul, []).append(d.name)
        config = model.mesh.consul
        key = _ClientKey(config, provider.description) if config and wanted else None
        if key != self._key:
            await self._stop_all()
            await self._close_client()
            self._key = key
            self._client_error = None
            if key is not None:
                try:
                    self._client = self._client_factory(key.config)
                except ConfigError as exc:  # py-consul missing: say so in status, keep serving
                    self._client_error = str(exc)
        self._provider = provider
        for service in list(self._tasks):
            if service not in wanted:
                task = self._tasks.pop(service)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with self._lock:
            for service in list(self._status):
                if service not in wanted:
                    del self._status[service]
            for service in wanted:
                self._status.setdefault(service, ServiceStatus(service))
            self._destinations = wanted
        if self._client is None:
            if wanted:  # validation requires the Mesh's consul: only a code-built model lacks it
                self._record_all(wanted, self._client_error or "the Mesh has no consul settings")
            return
        for service in wanted:
            if service not in self._tasks:
                self._tasks[service] = asyncio.create_task(
                    self._watch(service), name=f"consul-watch-{service.service}"
                )

    def _record_all(self, services: dict[ConsulService, list[str]], message: str) -> None:
        with self._lock:
            for service in services:
                self._status[service].last_error = message

    async def close(self) -> None:
        await self._stop_all()
        await self._close_client()
        self._key = None

    async def _stop_all(self) -> None:
        """Cancel every watch; statuses (and last known instances) stay."""
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    # -- readers ---------------------------------------------------------------------------------

    def endpoints(self, model: PolicyModel) -> dict[str, tuple[Instance, ...]]:
        """Last known instances of each Consul-backed destination (unknown ones are left out)."""
        with self._lock:
            out: dict[str, tuple[Instance, ...]] = {}
            for d in model.destinations:
                status = self._status.get(d.consul) if d.consul is not None else None
                if status is not None and status.instances is not None:
                    out[d.name] = status.instances
            return out

    def status_json(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                s.to_json(list(self._destinations.get(service, [])))
                for service, s in sorted(self._status.items(), key=lambda kv: _sort_key(kv[0]))
            ]

    # -- the watch -------------------------------------------------------------------------------

    async def _watch(self, service: ConsulService) -> None:
        index: str | None = None
        while True:
            started = time.monotonic()
            query = functools.partial(self._query, service, index)
            new_index, entries = await self._backoff.until_success(query, _ignore)
            instances, skipped = instances_of(entries)
            index = self._next_index(index, new_index)
            changed = self._succeeded(service, instances, skipped, index)
            if changed:
                self.on_change()
            elif time.monotonic() - started < self.settings.min_interval:
                await asyncio.sleep(self.settings.min_interval)  # Consul said "no change" at once

    async def _query(
        self, service: ConsulService, index: str | None
    ) -> tuple[str, list[HealthEntry]]:
        """One (blocking) query; a failure is recorded in status, then raised to be retried."""
        token: str | None = None
        try:
            if self._client is None:
                raise ConfigError("consul: no client")  # configure() starts watches only with one
            token = await self._token()
            return await self._client.health_service(
                service.service,
                index=index,
                wait=self.settings.wait_seconds,
                passing=service.passing_only,
                tag=service.tag,
                token=token,
            )
        except Exception as exc:
            self._failed(service, exc, token)
            raise

    async def _token(self) -> str | None:
        config = self._key.config if self._key else None
        if config is None or config.token_secret is None or self._provider is None:
            return None
        value = await asyncio.to_thread(self._provider.read, config.token_secret)
        if value is None:
            raise ConfigError(f"consul: token secret {config.token_secret!r} not found")
        return value

    @staticmethod
    def _next_index(previous: str | None, new: str) -> str | None:
        """Consul's rules: an index that went backwards resets the watch (a fresh, non-blocking
        query); an index below 1 is treated as 1, never 0 (which would not block)."""
        try:
            value = int(new)
        except ValueError:
            return None
        if previous is not None and value < int(previous):
            return None
        return str(max(value, 1))

    def _succeeded(
        self,
        service: ConsulService,
        instances: tuple[Instance, ...],
        skipped: int,
        index: str | None,
    ) -> bool:
        with self._lock:
            status = self._status.get(service)
            if status is None:
                return False
            changed = status.instances != instances
            recovered = status.last_error is not None
            status.instances, status.skipped = instances, skipped
            status.index, status.last_success_at = index, _now()
            status.last_error = None
        if recovered:
            log.info("consul: watch of %r recovered", service.service)
        if changed:
            log.info(
                "consul: %r now has %d instance(s) (index %s)",
                service.service,
                len(instances),
                index,
            )
        return changed

    def _failed(self, service: ConsulService, exc: BaseException, token: str | None) -> None:
        message = describe_error(exc, token)
        with self._lock:
            status = self._status.get(service)
            if status is None:
                return
            first = status.last_error is None
            status.last_error, status.last_error_at = message, _now()
        if first:  # one line per outage, not per retry
            log.warning(
                "consul: watching %r failed (%s); keeping its last known instances",
                service.service,
                message,
            )

    def _py_consul(self, config: ConsulConfig) -> ConsulClient:
        wait = self.settings.wait_seconds
        # a blocking query may take `wait` plus Consul's jitter (wait/16) to answer
        timeout = wait + wait / 16 + 10
        return PyConsulClient(config, timeout=timeout, needed_by="consul destinations need")


def _ignore(exc: BaseException, delay: float) -> None:
    """Failures are recorded (and logged once per outage) by `_query` itself."""


def _sort_key(s: ConsulService) -> tuple[str, str, bool]:
    return (s.service, s.tag or "", s.passing_only)

"""The pacer beside one gateway Envoy: ext_proc on a grpc.aio server and global limits on a
small HTTP/1.1 server (`limits_http`), each on a unix socket in the gateway's private
directory (agents cannot reach them), on a thread and event loop of their own so a slow store
or a long queue never stalls the gateway process's loop.

Metrics are served by prometheus-client's own thread on loopback (`--metrics-port`) or on the
one address the operator gives (`--metrics-address`, e.g. a pod IP), never on every interface
unless that address says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc

from meshgate.errors import ConfigError
from meshgate.pacer.ext_proc import ExternalProcessor, PacerSettings
from meshgate.pacer.fair_queue import Limiter
from meshgate.pacer.leases import LeasedLimits
from meshgate.pacer.limits_http import LimitsEndpoint, LimitsProtocol
from meshgate.pacer.metrics import PacerMetrics
from meshgate.pacing.spec import limits_socket
from meshgate.pacing.store import LimitStore

log = logging.getLogger(__name__)

SOCKET_MODE = 0o600
GIL_SWITCH_S = 0.0005
LIMITS_TIMEOUT_S = 1.1  # a store.hit's bound (the store's own is shorter); under Envoy's 1.5 s
# one ext_proc stream per request in flight or queued, over one HTTP/2 connection per Envoy
# worker: never let the connection's stream limit be what queues requests
SERVER_OPTIONS = [("grpc.max_concurrent_streams", 1 << 20)]


class Pacer:
    """`store_factory` runs on the pacer's loop (async clients bind to the loop they start
    on); the store is closed there when the pacer stops."""

    def __init__(
        self,
        socket: Path,
        store_factory: Callable[[], LimitStore],
        settings: PacerSettings | None = None,
    ) -> None:
        """`socket`: ext_proc's; global limits listen beside it (`limits_socket`)."""
        self.socket = socket
        self.limits_socket = limits_socket(socket)
        self.limiter = Limiter()
        self.metrics = PacerMetrics(self.limiter)
        self._store_factory = store_factory
        self._settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._limits_server: asyncio.AbstractServer | None = None
        self.leases: LeasedLimits | None = None
        self._store: LimitStore | None = None
        self._ext_proc: ExternalProcessor | None = None
        self._metrics_server: Any = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "pacer not started"
        return self._loop

    def start(self) -> None:
        """Serve (blocking until the socket listens); raises if it cannot.

        Shortens the process's GIL switch interval (`GIL_SWITCH_S`): the pacer answers while
        the gateway process's other threads (the audit shipper parsing a batch) run Python, and
        with the default 5 ms a ready answer could wait that long for the GIL: every request
        of a paced or globally limited route would carry it in its tail latency."""
        if sys.getswitchinterval() > GIL_SWITCH_S:
            sys.setswitchinterval(GIL_SWITCH_S)
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="meshgate-pacer", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(), loop).result(timeout=30)
        except BaseException:
            self.stop()
            raise

    def serve_metrics(self, port: int, host: str = "127.0.0.1") -> int:
        """Prometheus text on http://host:port/metrics; the port bound (0: a free one)."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
        self._metrics_server = server
        return int(server.server_address[1])

    async def _serve(self) -> None:
        mode = self.socket.parent.stat().st_mode
        if mode & 0o077:  # anyone else who could connect could spend or read every budget
            raise ConfigError(
                f"pacer: {self.socket.parent} is open to others ({stat.filemode(mode)}); "
                "its socket must be in a private directory"
            )
        self._store = self._store_factory()
        self._ext_proc = ExternalProcessor(self._store, self.limiter, self.metrics, self._settings)
        self.leases = LeasedLimits(
            self._store, LIMITS_TIMEOUT_S, on_take=self.metrics.limit_store_call
        )
        endpoint = LimitsEndpoint(self.leases, self.metrics)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((self._ext_proc.handler(),))
        for path in (self.socket, self.limits_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale socket from a previous run
        # the directory is private (0700), so nobody else can connect before the chmod; no
        # umask change here: it is process-wide, and other threads create files and dirs
        if server.add_insecure_port(f"unix:{self.socket}") == 0:
            raise ConfigError(f"pacer: cannot listen on {self.socket}")
        await server.start()
        os.chmod(self.socket, SOCKET_MODE)
        self._server = server
        loop = asyncio.get_running_loop()
        self._limits_server = await loop.create_unix_server(
            lambda: LimitsProtocol(endpoint), str(self.limits_socket)
        )
        os.chmod(self.limits_socket, SOCKET_MODE)
        log.info("pacer listening on %s and %s", self.socket, self.limits_socket)

    def stop(self, grace: float = 1.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            fut: Future[None] = asyncio.run_coroutine_threadsafe(self._shutdown(grace), loop)
            with contextlib.suppress(Exception):
                fut.result(timeout=grace + 10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        for path in (self.socket, self.limits_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _shutdown(self, grace: float) -> None:
        if self._limits_server is not None:
            self._limits_server.close()
        if self._server is not None:
            await self._server.stop(grace)
        if self._ext_proc is not None:
            await self._ext_proc.drain()
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.close()

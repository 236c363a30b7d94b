"""The gRPC port nodes connect to: ADS, the access-log service, and any later gRPC service.

Services contribute generic handlers; this binds one grpc.aio server (TLS when credentials are
given) so every node reaches all of them on one port with one join token.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

import grpc

from meshgate.controlplane.ads import SERVER_OPTIONS
from meshgate.errors import ConfigError


class XdsServer:
    def __init__(
        self,
        host: str,
        port: int,
        handlers: Sequence[grpc.GenericRpcHandler[Any, Any]],
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.host = host
        self.port = port  # the bound one after start() (0 asks the OS for one)
        self.handlers = tuple(handlers)
        self.credentials = credentials
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        # no SO_REUSEPORT: a second control plane on a taken port must fail, not share it
        server = grpc.aio.server(options=(*SERVER_OPTIONS, ("grpc.so_reuseport", 0)))
        server.add_generic_rpc_handlers(self.handlers)
        try:
            if self.credentials is None:
                port = server.add_insecure_port(self.address)
            else:
                port = server.add_secure_port(self.address, self.credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            await server.stop(None)  # never started, but it must not be left to the collector
            why = await asyncio.to_thread(_why_no_bind, self.host, self.port)
            raise ConfigError(f"cannot listen for xDS on {self.address}: {why}")
        self.port = port
        await server.start()
        self._server = server

    async def stop(self, grace: float = 1.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=grace)


def _why_no_bind(host: str, port: int) -> str:
    """What binding `host:port` says (gRPC only says it failed): a name that does not resolve,
    an address this host does not have, or a port in use."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return "address in use?"

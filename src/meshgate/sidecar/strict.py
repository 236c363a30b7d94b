"""`sidecar run --strict`: CMD in its own network namespace, the sidecar its only way out.

The namespace (made by netns_exec.py) has only loopback, so a direct dial to any outside IP
fails with "Network is unreachable" and the host's loopback services are not there at all.
The sidecar Envoy stays in the host namespace and opens one extra listener *inside* the
agent's namespace (SocketAddress.network_namespace_filepath = /proc/<pid>/ns/net) on
127.0.0.1:NETNS_PROXY_PORT; it TCP-proxies to the sidecar's ordinary loopback listener
through the LOOPBACK_CLUSTER that every agent snapshot carries. The listener names a
per-instance path, so it lives in this instance's bootstrap; xDS snapshots stay per agent.
No addresses, routes, veth pairs, Unix sockets or forwarder processes to manage.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys

from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from meshgate.errors import ConfigError
from meshgate.xds.common import pack
from meshgate.xds.sidecar import LOOPBACK_CLUSTER

NETNS_PROXY_PORT = 15080  # inside the agent's private namespace: nothing else can hold it
NETNS_LISTENER = "agent-proxy-netns"


def netns_listener(netns_path: str, port: int = NETNS_PROXY_PORT) -> listener_pb2.Listener:
    """127.0.0.1:port inside the namespace at `netns_path`, relayed to the sidecar's proxy."""
    listener = listener_pb2.Listener(
        name=NETNS_LISTENER,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.tcp_proxy",
                        typed_config=pack(
                            tcp_proxy_pb2.TcpProxy(stat_prefix="netns", cluster=LOOPBACK_CLUSTER)
                        ),
                    )
                ]
            )
        ],
    )
    sock = listener.address.socket_address
    sock.address, sock.port_value, sock.network_namespace_filepath = "127.0.0.1", port, netns_path
    return listener


class Jail:
    """CMD's process, already in its empty namespace, held before exec until `release`."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proc = proc
        self._reader = reader
        self._writer = writer

    @property
    def netns_path(self) -> str:
        """Valid while the process lives; it keeps its pid across exec."""
        return f"/proc/{self.proc.pid}/ns/net"

    @classmethod
    async def create(cls, command: list[str], env: dict[str, str]) -> Jail:
        """Fails with the one-line privilege error before anything else (Envoy) starts."""
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not from the working directory: this runs privileged, before the jail
                "-m",
                "meshgate.sidecar.netns_exec",
                str(theirs.fileno()),
                *command,
                env=env,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()  # the child holds it now; our copy would hide its EOF
        reader, writer = await asyncio.open_connection(sock=ours)
        jail = cls(proc, reader, writer)
        try:
            line = (await asyncio.wait_for(reader.readline(), 30)).decode().strip()
        except TimeoutError:
            line = "error strict mode: CMD's network namespace was not ready within 30s"
        if line != "ready":
            await jail.abandon()
            raise ConfigError(
                line.removeprefix("error ") or "strict mode: CMD's network namespace failed"
            )
        return jail

    async def release(self) -> asyncio.subprocess.Process:
        """Let CMD exec; returns its process (same pid) or raises if exec failed."""
        self._writer.write(b"go\n")
        await self._writer.drain()
        line = (await self._reader.readline()).decode().strip()  # EOF: exec closed the socket
        self._writer.close()
        if line:
            await self.proc.wait()
            raise ConfigError(line.removeprefix("error "))
        return self.proc

    async def abandon(self) -> None:
        """CMD never runs: closing the channel makes the waiting jail exit."""
        self._writer.close()
        if self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()

"""`sidecar run --strict`: CMD in its own network namespace, the sidecar its only way out.

The namespace (made by netns_exec.py) has only loopback, so a direct dial to any outside IP
fails with "Network is unreachable" and the host's loopback services are not there at all.
The sidecar Envoy stays in the host namespace and opens its proxy listener *only inside* the
agent's namespace (SocketAddress.network_namespace_filepath = /proc/<pid>/ns/net) on
127.0.0.1:NETNS_PROXY_PORT: no host process can reach this agent's sidecar, and this agent
reaches no other. The listener names a per-instance path, so it lives in this instance's
bootstrap (xds/sidecar.proxy_listener); xDS snapshots stay per agent.
No addresses, routes, veth pairs, Unix sockets or forwarder processes to manage.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys

from meshgate.errors import ConfigError

NETNS_PROXY_PORT = 15080  # inside the agent's private namespace: nothing else can hold it


class Jail:
    """CMD's process, privileges dropped (and in strict mode in its empty namespace), held
    before exec until `release` (sidecar/agent_exec.py does the dropping)."""

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
    async def create(
        cls,
        command: list[str],
        env: dict[str, str],
        *,
        netns: bool,
        uid: int = -1,
        gid: int = -1,
        cwd: str | None = None,
    ) -> Jail:
        """Fails with the one-line privilege error before anything else (Envoy) starts.

        `uid`/`gid` < 0: CMD keeps the launcher's user (only --insecure-same-user)."""
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not from the working directory: this runs privileged, before the jail
                "-m",
                "meshgate.sidecar.agent_exec",
                str(theirs.fileno()),
                "1" if netns else "0",
                str(uid),
                str(gid),
                *command,
                env=env,
                cwd=cwd,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()  # the child holds it now; our copy would hide its EOF
        reader, writer = await asyncio.open_connection(sock=ours)
        jail = cls(proc, reader, writer)
        try:
            line = (await asyncio.wait_for(reader.readline(), 30)).decode().strip()
        except TimeoutError:
            line = "error CMD's jail was not ready within 30s"
        if line != "ready":
            await jail.abandon()
            raise ConfigError(line.removeprefix("error ") or "could not prepare CMD's process")
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

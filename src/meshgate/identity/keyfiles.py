"""Signing keys that live in the state directory: created once (0600), then loaded.

Replicas starting together may race to create a key; the file is written aside and hard-linked
into place, so the loser never reads half a key and uses the winner's.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshgate.errors import MeshgateError

K = TypeVar("K", bound=PrivateKeyTypes)


def load_or_create_key(
    path: Path,
    generate: Callable[[], K],
    accept: Callable[[PrivateKeyTypes], K | None],
    what: str,
    error: type[MeshgateError],
) -> K:
    """The key at `path`, created with `generate` when absent; `accept` returns the loaded key
    when it is of the expected kind (else None: an `error` naming `what` was expected)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if create_exclusive(path, pem):
            return key
        data = path.read_bytes()  # another process created it first: use theirs
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except ValueError:
        raise error(f"{path}: not a PEM private key") from None
    accepted = accept(loaded)
    if accepted is None:
        raise error(f"{path}: expected {what}")
    return accepted


def create_exclusive(path: Path, data: bytes) -> bool:
    """Write a whole 0600 file at `path` unless one exists (then False)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True

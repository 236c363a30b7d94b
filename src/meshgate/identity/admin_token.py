"""The operator token of the admin HTTP API: created once in the state directory, then loaded.

`<state>/admin/token` (file 0600, directory 0700) holds 256 random bits, URL-safe base64. Control
planes sharing a state directory agree on it: the first to start creates it exclusively (written
aside, hard-linked into place, as the signing keys are), the others read that one. A deployment
may supply its own (`meshgate serve --admin-token-file`, e.g. from a Kubernetes Secret).

Only the file's path ever appears in errors and logs, never the token.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from meshgate.errors import ConfigError
from meshgate.identity.keyfiles import create_exclusive

TOKEN_DIR = "admin"
TOKEN_FILE = "token"
MIN_LENGTH = 32  # characters; a generated token has 43 (256 bits)
# RFC 6750 b64token: what may follow "Bearer " unquoted
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def token_path(state_dir: Path) -> Path:
    return state_dir / TOKEN_DIR / TOKEN_FILE


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def check_token(text: str, path: Path) -> str:
    """The token in a file's text (surrounding whitespace dropped), or a ConfigError."""
    token = text.strip()
    if len(token) < MIN_LENGTH or not _TOKEN_RE.fullmatch(token):
        raise ConfigError(
            f"{path}: an admin token must be at least {MIN_LENGTH} characters of "
            "A-Z a-z 0-9 - . _ ~ + / = (e.g. `openssl rand -hex 32`)"
        )
    return token


def load_token_file(path: Path) -> str:
    """A supplied token file, refused when any user may read it (the token would be no secret)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the admin token: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the admin token is not ASCII text") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            f"{path}: the admin token file is accessible to every user "
            f"(mode {stat.S_IMODE(mode):04o}); chmod o-rw it"
        )
    return check_token(text, path)


def load_or_create_token(state_dir: Path) -> str:
    """`<state>/admin/token`, created (0600 in a 0700 directory) when absent."""
    path = token_path(state_dir)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)  # also when it existed: nobody else lists or opens it
        if not path.exists():
            create_exclusive(path, (generate_token() + "\n").encode())  # False: another won
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the admin token: {exc.strerror}") from None
    return load_token_file(path)

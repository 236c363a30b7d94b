"""The operator side of the admin HTTP API: find the token, send it, turn failures into one line.

The token comes from `--admin-token-file`, else `$MESHGATE_ADMIN_TOKEN`, else the control plane's
state directory (`<state>/admin/token`, readable by its operator only). The token is sent only as
`Authorization: Bearer` to the URL given; it is never printed, and redirects are not followed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from meshgate.errors import MeshgateError
from meshgate.identity.admin_token import token_path

TOKEN_ENV = "MESHGATE_ADMIN_TOKEN"
HINT = (
    "pass --admin-token-file FILE, set MESHGATE_ADMIN_TOKEN, or give --state-dir of the "
    "control plane (its admin/token)"
)


class AdminError(MeshgateError):
    """An admin API failure, as one line for the operator."""


class Unreachable(AdminError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AdminToken:
    value: str | None
    source: str  # where it came from, or where none was found (for messages; no secret)

    def __repr__(self) -> str:  # never show the value
        return f"AdminToken(source={self.source!r})"


def find_token(token_file: Path | None, state_dir: Path) -> AdminToken:
    """The operator token; `value` None (and why in `source`) when there is none to send."""
    if token_file is not None:
        try:
            value = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise AdminError(f"--admin-token-file {token_file}: cannot read: {why}") from None
        if not value:
            raise AdminError(f"--admin-token-file {token_file}: the file is empty")
        return AdminToken(value, f"--admin-token-file {token_file}")
    value = os.environ.get(TOKEN_ENV, "").strip()
    if value:
        return AdminToken(value, f"${TOKEN_ENV}")
    path = token_path(state_dir)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return AdminToken(None, f"no {path}")
    except (OSError, UnicodeDecodeError) as exc:
        return AdminToken(None, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
    return AdminToken(value or None, str(path) if value else f"{path} is empty")


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # the decoded JSON


class AdminClient:
    """Requests to one control plane's admin API (`base`, e.g. http://127.0.0.1:18001)."""

    def __init__(self, base: str, token: AdminToken, timeout: float = 30) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, params: dict[str, str] | None = None) -> Answer:
        """The answer's status and JSON body; `Unreachable`, or an `AdminError` for a refused
        or missing token and for a body that is not JSON."""
        headers = {"Accept": "application/json"}
        if self.token.value is not None:
            headers["Authorization"] = f"Bearer {self.token.value}"
        try:
            resp = httpx.request(
                method,
                self.base + path,
                params=params,
                headers=headers,
                timeout=self.timeout,
                follow_redirects=False,
            )
        except httpx.HTTPError as exc:
            raise Unreachable(str(exc) or type(exc).__name__) from None
        if resp.status_code == 401:
            raise AdminError(self._refused())
        try:
            body = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AdminError(
                f"{self.base}{path} answered {resp.status_code} without JSON: "
                "is this a meshgate control plane's admin URL?"
            ) from None
        return Answer(resp.status_code, body)

    def _refused(self) -> str:
        if self.token.value is None:
            return (
                f"the control plane at {self.base} needs its admin token and none was found "
                f"({self.token.source}): {HINT}"
            )
        return (
            f"the control plane at {self.base} refused the admin token from "
            f"{self.token.source} (401): it is not this control plane's token; {HINT}"
        )

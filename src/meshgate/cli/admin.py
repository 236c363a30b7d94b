"""Commands' side of the admin API: `meshgate.adminclient` with its failures as one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshgate.adminclient import AdminClient, AdminError, Answer, Unreachable, find_token
from meshgate.cli.common import fail


def connect(
    base: str, token_file: Path | None, state_dir: Path, timeout: float = 30
) -> AdminClient:
    """A client sending the operator token (`--admin-token-file`, env, or the state dir's)."""
    try:
        return AdminClient(base, find_token(token_file, state_dir), timeout)
    except AdminError as exc:
        raise fail(str(exc)) from None


def call(
    client: AdminClient,
    method: str,
    path: str,
    params: dict[str, str] | None = None,
    where: str | None = None,
) -> Answer:
    """The answer, whatever its status; an unreachable control plane (named as `where`, default
    the URL), a refused or missing token, or a body that is not JSON is one line."""
    try:
        return client.request(method, path, params)
    except Unreachable as exc:
        where = where or f"{client.base}{path}"
        raise fail(f"cannot reach the control plane at {where}: {exc.reason}") from None
    except AdminError as exc:
        raise fail(str(exc)) from None


def get_ok(
    client: AdminClient, path: str, params: dict[str, str] | None = None, keys: tuple[str, ...] = ()
) -> Any:
    """GET's JSON body, holding `keys`; an error answer (4xx/5xx) is one line with its message."""
    answer = call(client, "GET", path, params, where=client.base)
    if answer.status >= 400:
        body = answer.body
        message = body.get("error") if isinstance(body, dict) else None
        raise fail(f"{client.base}: {message or f'HTTP {answer.status}'}")
    return shaped(answer.body, f"{client.base}{path}", keys)


def fields(answer: Answer, url: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The answer's JSON object holding `keys`; an error answer (`{"error": ...}`, 4xx/5xx) is
    its message in one line."""
    body = answer.body
    if isinstance(body, dict) and "error" in body:
        raise fail(str(body["error"]))
    if answer.status >= 400:
        raise fail(f"{url} answered HTTP {answer.status}")
    return shaped(body, url, keys)


def shaped(body: Any, url: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """`body` as an object holding `keys`, else one line: JSON of another shape comes from
    something that is not a meshgate control plane (a wrong --admin port), and reading it
    would end in a KeyError traceback."""
    if not isinstance(body, dict):
        got = f"a JSON {type(body).__name__}, not an object"
    elif missing := [k for k in keys if k not in body]:
        got = f"JSON without {', '.join(map(repr, missing))}"
    else:
        return body
    raise fail(f"{url} answered {got}: is this a meshgate control plane's admin URL?")

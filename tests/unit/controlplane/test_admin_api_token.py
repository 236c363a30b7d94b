"""The admin API answers only its operator: a real control plane on loopback, real HTTP.

Every route but the probes, the JWKS and the metrics needs `Authorization: Bearer <token>`; the
token lives in `<state>/admin/token` (0600 in 0700) or comes from `serve --admin-token-file`; the
operator's commands find it and say in one line what to do when they cannot.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from meshgate.cli import app as cli_app
from meshgate.cli.audit import audit_app
from meshgate.controlplane.admin import PUBLIC_PATHS
from meshgate.controlplane.server import ControlPlane, ServeOptions
from meshgate.controlplane.sources import DirectorySource
from meshgate.errors import ConfigError
from meshgate.identity.admin_token import load_or_create_token, load_token_file, token_path

POLICIES = Path(__file__).resolve().parents[3] / "policies"  # the README's example policy
PROTECTED = [
    ("GET", "/status"),
    ("GET", "/v1/policy"),
    ("GET", "/v1/audit"),
    ("GET", "/v1/audit/summary"),
    ("GET", "/v1/identity/researcher"),
    ("GET", "/v1/budgets"),
    ("POST", "/v1/ca/rotate"),
]
PUBLIC = ["/healthz", "/readyz", "/.well-known/jwks.json", "/metrics"]
WRONG = "x" * 43
runner = CliRunner()


def _options(**kw: object) -> ServeOptions:
    return ServeOptions(
        "127.0.0.1",
        0,  # the OS picks; the plane reports cp.xds_address / cp.admin_address
        "127.0.0.1",
        0,
        "127.0.0.1",
        debounce_quiet=0.01,
        mtls=True,
        **kw,  # type: ignore[arg-type]
    )


async def _started(state: Path, **kw: object) -> ControlPlane:
    plane = ControlPlane(DirectorySource(POLICIES, interval=0.1), state, _options(**kw))
    await plane.start()
    for _ in range(200):
        if plane.ready:
            return plane
        await asyncio.sleep(0.05)
    await plane.stop()
    raise AssertionError("control plane not ready")


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    plane = await _started(tmp_path / "state")
    try:
        yield plane
    finally:
        await plane.stop()


def _url(cp: ControlPlane, path: str) -> str:
    return f"http://{cp.admin_address}{path}"


def _serial(cp: ControlPlane) -> str:
    assert cp.issuer is not None
    return str(cp.issuer.authority()["intermediate_serial"])


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    "authorization",
    [None, f"Bearer {WRONG}", "Bearer", "Basic dXNlcjpwYXNz", "Bearer x", "Token abc"],
)
async def test_protected_routes_refuse_a_missing_or_wrong_token(
    cp: ControlPlane, method: str, path: str, authorization: str | None
) -> None:
    serial = _serial(cp)
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with httpx.AsyncClient() as client:
        resp = await client.request(method, _url(cp, path), headers=headers)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="meshgate-admin"')
    assert set(resp.json()) == {"error"}
    if authorization == f"Bearer {WRONG}":
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
        assert resp.json()["error"] == "invalid admin token"
    for leaked in ("researcher", "spiffe://", "records", "nodes"):  # nothing of the payload
        assert leaked not in resp.text
    assert _serial(cp) == serial  # the CA did not rotate


async def test_the_token_in_a_query_string_or_cookie_is_not_accepted(cp: ControlPlane) -> None:
    token = str(cp.admin_token)
    async with httpx.AsyncClient() as client:
        for resp in (
            await client.get(_url(cp, "/status"), params={"token": token}),
            await client.get(_url(cp, "/status"), params={"access_token": token}),
            await client.get(_url(cp, "/status"), headers={"Cookie": f"token={token}"}),
        ):
            assert resp.status_code == 401


async def test_protected_routes_answer_the_operator_token(cp: ControlPlane) -> None:
    auth = {"Authorization": f"Bearer {cp.admin_token}"}
    async with httpx.AsyncClient(headers=auth) as client:
        for method, path in PROTECTED:
            if method == "GET":
                resp = await client.get(_url(cp, path))
                assert resp.status_code == 200, (path, resp.text)
        assert (await client.get(_url(cp, "/status"))).json()["control_plane"]["ready"]
        shown = (await client.get(_url(cp, "/v1/identity/researcher"))).json()
        assert shown["spiffe_id"].endswith("/agent/researcher")
        # an agent the policy does not name: said so, not shown as waiting for a certificate
        unknown = await client.get(_url(cp, "/v1/identity/reseacher"))
        assert unknown.status_code == 404 and "no agent 'reseacher'" in unknown.json()["error"]
        before = _serial(cp)
        rotated = await client.post(_url(cp, "/v1/ca/rotate"))
        assert rotated.status_code == 200 and rotated.json()["rotated"] is True
        assert _serial(cp) != before
        # the scheme is case-insensitive (RFC 7235)
        lower = await client.get(
            _url(cp, "/status"), headers={"Authorization": f"bearer {cp.admin_token}"}
        )
        assert lower.status_code == 200


async def test_probes_jwks_and_metrics_stay_public(cp: ControlPlane) -> None:
    assert cp.policy.model is not None
    async with httpx.AsyncClient() as client:
        for path in PUBLIC:
            resp = await client.get(_url(cp, path))
            assert resp.status_code == 200, (path, resp.text)
        assert "keys" in (await client.get(_url(cp, "/.well-known/jwks.json"))).json()
        metrics = (await client.get(_url(cp, "/metrics"))).text
    assert "meshgate_policy_applied_total" in metrics
    # public because it names nothing: no agent, destination, SPIFFE ID or policy text
    for agent in cp.policy.model.agents:
        assert agent.agent not in metrics and agent.name not in metrics
    for dest in cp.policy.model.destinations:
        assert dest.host not in metrics
    assert "spiffe://" not in metrics


async def test_every_route_is_public_by_name_or_protected(cp: ControlPlane) -> None:
    """A new route is protected unless added to PUBLIC_PATHS on purpose; unknown paths too."""
    assert set(PUBLIC) == PUBLIC_PATHS
    assert cp.admin_server is not None
    routes = {r.resource.canonical for r in cp.admin_server.app.router.routes() if r.resource}
    protected = {p.replace("researcher", "{agent}") for _, p in PROTECTED}
    assert routes == PUBLIC_PATHS | protected
    async with httpx.AsyncClient() as client:
        for path in ("/nope", "/status/", "//status", "/v1/audit/../../status", "/HEALTHZ"):
            resp = await client.get(_url(cp, path))
            assert resp.status_code == 401, path


async def test_token_file_created_once_owner_only_and_shared_by_replicas(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with ProcessPoolExecutor(4) as pool:  # replicas starting together on one state dir
        tokens = list(pool.map(load_or_create_token, [state] * 8))
    assert len(set(tokens)) == 1 and len(tokens[0]) >= 43
    path = token_path(state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary files left
    plane = await _started(state)  # a control plane on that state dir uses the same token
    try:
        assert plane.admin_token == tokens[0]
    finally:
        await plane.stop()
    os.chmod(path.parent, 0o755)  # loosened by hand: tightened again at start
    assert load_or_create_token(state) == tokens[0]
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_a_supplied_token_file_replaces_the_state_one(tmp_path: Path) -> None:
    supplied = tmp_path / "admin-token"
    supplied.write_text("s3cr3t-" + "a" * 40 + "\n")
    supplied.chmod(0o440)  # as a Kubernetes Secret volume with fsGroup mounts it
    plane = await _started(tmp_path / "state", admin_token_file=supplied)
    try:
        assert plane.admin_token == "s3cr3t-" + "a" * 40
        assert not token_path(tmp_path / "state").exists()
        async with httpx.AsyncClient() as client:
            ok = await client.get(
                _url(plane, "/status"), headers={"Authorization": f"Bearer {plane.admin_token}"}
            )
        assert ok.status_code == 200
    finally:
        await plane.stop()


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("short", 0o600, "at least 32 characters"),
        ("has spaces in it " * 3, 0o600, "at least 32 characters"),
        ("k" * 40, 0o644, "accessible to every user (mode 0644)"),
        (None, 0o600, "cannot read the admin token"),
    ],
)
async def test_a_bad_supplied_token_stops_the_start_in_one_line(
    tmp_path: Path, text: str | None, mode: int, message: str
) -> None:
    supplied = tmp_path / "admin-token"
    if text is not None:
        supplied.write_text(text)
        supplied.chmod(mode)
    with pytest.raises(ConfigError) as refused:
        load_token_file(supplied)
    assert message in str(refused.value) and str(supplied) in str(refused.value)
    if text is not None:
        assert text.strip() not in str(refused.value)  # never the token itself
    opts = _options(admin_token_file=supplied)
    plane = ControlPlane(DirectorySource(POLICIES), tmp_path / "state", opts)
    with pytest.raises(ConfigError, match=message.split(" (")[0]):
        await plane.start()
    await plane.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", opts.admin_port), 1):
        pass  # nothing listens


async def _cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The operator's command, off the event loop that serves the control plane."""
    env = {"MESHGATE_ADMIN_TOKEN": "", "COLUMNS": "200", **(env or {})}
    result = await asyncio.to_thread(runner.invoke, cli_app, args, env=env)
    return result.exit_code, result.stdout, result.stderr


async def _audit_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    env = {"MESHGATE_ADMIN_TOKEN": "", **(env or {})}
    result = await asyncio.to_thread(runner.invoke, audit_app, args, env=env)
    return result.exit_code, result.stdout, result.stderr


async def test_operator_commands_send_the_token(cp: ControlPlane, tmp_path: Path) -> None:
    admin = ["--admin", f"http://{cp.admin_address}"]
    state = ["--state-dir", str(cp.state_dir)]
    code, out, err = await _cli(["status", *admin, *state])
    assert code == 0 and "policy" in out, err
    token_file = tmp_path / "tok"
    token_file.write_text(f"{cp.admin_token}\n")
    code, out, err = await _cli(
        ["identity", "show", "--agent", "researcher", *admin, "--admin-token-file", str(token_file)]
    )
    assert code == 0 and "spiffe://" in out, err
    code, out, err = await _cli(
        ["plan", str(POLICIES), *admin], env={"MESHGATE_ADMIN_TOKEN": str(cp.admin_token)}
    )
    assert code == 0 and "No changes." in out, err
    before = _serial(cp)
    code, out, err = await _cli(["ca", "rotate", *admin, *state])
    assert code == 0 and "new intermediate" in out, err
    assert _serial(cp) != before
    cp_url = ["--control-plane", f"http://{cp.admin_address}"]
    code, out, err = await _audit_cli(["query", *cp_url, *state, "--format", "json"])
    assert code == 0, err
    code, out, err = await _audit_cli(["summary", *cp_url, "--admin-token-file", str(token_file)])
    assert code == 0 and "total" in out, err


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["identity", "show", "--agent", "researcher"],
        ["ca", "rotate"],
        ["plan", str(POLICIES)],
        ["audit", "query", "--control-plane"],
        ["audit", "summary", "--control-plane"],
    ],
)
async def test_a_missing_or_refused_token_is_one_line_saying_what_to_do(
    cp: ControlPlane, tmp_path: Path, command: list[str]
) -> None:
    url = f"http://{cp.admin_address}"
    where = [url] if command[-1] == "--control-plane" else ["--admin", url]
    base = [*command, *where, "--state-dir", str(tmp_path / "not-the-state")]
    serial = _serial(cp)
    code, out, err = await _cli(base)
    assert code == 1 and out == ""
    assert err.count("\n") == 1, err
    assert f"the control plane at {url} needs its admin token and none was found" in err
    assert "--admin-token-file" in err and "MESHGATE_ADMIN_TOKEN" in err
    code, out, err = await _cli(base, env={"MESHGATE_ADMIN_TOKEN": WRONG})
    assert code == 1 and err.count("\n") == 1, err
    assert "refused the admin token from $MESHGATE_ADMIN_TOKEN (401)" in err
    assert WRONG not in err and str(cp.admin_token) not in err
    unreadable = tmp_path / "missing-token-file"
    code, out, err = await _cli([*base, "--admin-token-file", str(unreadable)])
    assert code == 1 and f"--admin-token-file {unreadable}: cannot read" in err
    assert _serial(cp) == serial

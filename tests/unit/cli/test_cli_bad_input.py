"""Bad input a new user gives the CLI: one line saying what and where, nothing written or left
running that the user did not ask for (found by following the docs literally)."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from meshgate.cli import app
from meshgate.errors import EnvoyError

runner = CliRunner()
# the module: `meshgate.cli.gateway` as an attribute is the command function of that name
gateway = importlib.import_module("meshgate.cli.gateway")


def test_up_stops_the_gateway_it_started_when_envoy_never_gets_ready(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `up` on a policy the control plane refused: Envoy never gets ready, and `up` only stops
    # a gateway start_gateway returned, so Envoy and the pacer must be stopped here
    events: list[str] = []

    class FakeGateway:
        admin = None

        async def start(self) -> None:
            events.append("envoy started")

        async def wait_ready(self, timeout: float = 30.0) -> None:
            raise EnvoyError("envoy was not ready within 30s")

        async def stop(self) -> None:
            events.append("envoy stopped")

    class FakePacer:
        def start(self) -> None:
            events.append("pacer started")

        def stop(self) -> None:
            events.append("pacer stopped")

    import meshgate.sidecar.launcher as launcher

    monkeypatch.setattr(launcher, "prepare_gateway", lambda *a, **k: FakeGateway())
    monkeypatch.setattr(gateway, "_pacer", lambda *a: FakePacer())

    async def start() -> Any:
        return await gateway.start_gateway("127.0.0.1:1", "local", tmp_path, False, 1, True)

    with pytest.raises(EnvoyError):
        asyncio.run(start())
    assert events == ["pacer started", "envoy started", "envoy stopped", "pacer stopped"]


@pytest.mark.parametrize("agent", ["Bad_Name", "a/b", "../status", "a?x=1", ""])
def test_agent_names_that_name_no_agent_are_refused(agent: str, tmp_path: Path) -> None:
    # `identity show --agent 'a?x=1'` showed agent a; '../status' asked another admin route
    for args in (
        ["identity", "show", "--agent", agent, "--admin", "http://127.0.0.1:1"],
        ["token", "create", "--agent", agent, "--state-dir", str(tmp_path)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert f"--agent {agent!r}: use lower-case letters" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "tokens").exists()


def test_token_create_says_when_it_made_a_new_signing_key(tmp_path: Path) -> None:
    # a mistyped --state-dir silently gave a token no control plane accepts
    first = runner.invoke(
        app, ["token", "create", "--agent", "coder", "--state-dir", str(tmp_path)]
    )
    assert first.exit_code == 0, first.output
    assert "created " + str(tmp_path / "tokens" / "signing-key.pem") in first.stderr
    again = runner.invoke(
        app, ["token", "create", "--agent", "coder", "--state-dir", str(tmp_path)]
    )
    assert again.exit_code == 0, again.output
    assert "signing key" not in again.stderr


def test_token_revoke_refuses_what_it_cannot_revoke(tmp_path: Path) -> None:
    created = runner.invoke(app, ["token", "create", "--agent", "a", "--state-dir", str(tmp_path)])
    token_id = created.stderr.split("token id ")[1].split()[0]
    typo = runner.invoke(app, ["token", "revoke", token_id[:-1], "--state-dir", str(tmp_path)])
    assert typo.exit_code == 1
    assert "is not a token id" in typo.output
    assert not (tmp_path / "tokens" / "revoked.json").exists()
    elsewhere = tmp_path / "other"
    wrong_dir = runner.invoke(app, ["token", "revoke", token_id, "--state-dir", str(elsewhere)])
    assert wrong_dir.exit_code == 1
    assert f"{elsewhere} issued no tokens" in wrong_dir.output
    assert not elsewhere.exists()  # no signing key made just to revoke
    ok = runner.invoke(app, ["token", "revoke", token_id, "--state-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert token_id in (tmp_path / "tokens" / "revoked.json").read_text()


@pytest.mark.parametrize("command", [["query"], ["summary"], ["verify"], ["tail"]])
def test_audit_commands_do_not_turn_an_empty_file_into_a_store(
    command: list[str], tmp_path: Path
) -> None:
    # `audit summary --store notes.txt` on an empty file wrote the audit schema into it
    empty = tmp_path / "notes.txt"
    empty.touch()
    result = runner.invoke(app, ["audit", *command, "--store", str(empty)])
    assert result.exit_code == 1, result.output
    assert f"no audit log at {empty}" in result.output
    assert empty.stat().st_size == 0


def _policy_dir(root: Path) -> Path:
    directory = root / "policies"
    directory.mkdir()
    (directory / "mesh.yaml").write_text(
        "apiVersion: meshgate.dev/v1\nkind: Mesh\nmetadata: {name: default}\n"
        "spec: {trustDomain: agents.local}\n"
    )
    return directory


@pytest.mark.parametrize(
    ("text", "message"),
    [("disable: [MG999]\n", "unknown check 'MG999'"), ("foo: 1\n", "unknown field 'foo'")],
)
def test_lint_config_errors_name_the_file(text: str, message: str, tmp_path: Path) -> None:
    directory = _policy_dir(tmp_path)
    given = tmp_path / "lint.yaml"
    given.write_text(text)
    (directory / ".meshgate-lint.yaml").write_text(text)
    for args, path in ((["--config", str(given)], given), ([], directory / ".meshgate-lint.yaml")):
        result = runner.invoke(app, ["lint", str(directory), *args])
        assert result.exit_code == 1, result.output
        assert f"error: {path}: {message}" in result.output


def test_envoy_never_ready_points_at_the_control_plane(tmp_path: Path) -> None:
    # `sidecar run --agent ghost` (no such agent) or `up` on a refused policy: after 30 s only
    # "envoy was not ready", which sends the user to Envoy, not to what it waits for
    from meshgate.sidecar.envoy_admin import AdminSocket
    from meshgate.sidecar.envoy_process import EnvoyProcess

    envoy = EnvoyProcess(tmp_path / "bootstrap.json", AdminSocket.in_dir(tmp_path))
    with pytest.raises(EnvoyError, match="no configuration from the control plane") as caught:
        asyncio.run(envoy.wait_ready(0.2))
    assert "meshgate status" in str(caught.value)


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["token", "create", "--agent", "a"], "tokens/signing-key.pem: Not a directory"),
        (["up", "--xds-port", "0", "--admin-port", "0"], ": exists and is not a directory"),
    ],
)
def test_a_state_dir_that_is_a_file_is_one_line(
    args: list[str], shown: str, tmp_path: Path
) -> None:
    # every command that makes its state directory showed a FileExistsError traceback
    state = tmp_path / "state"
    state.write_text("not a directory\n")
    result = subprocess.run(
        [sys.executable, "-m", "meshgate.cli", *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {state}")
    assert shown in result.stderr
    assert state.read_text() == "not a directory\n"


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["serve", "--xds-port", "70000"], "--xds-port"),
        (["up", "--admin-port", "-1"], "--admin-port"),
        (["sidecar", "run", "--agent", "a", "--proxy-port", "99999", "--", "true"], "--proxy-port"),
        (["gateway", "--metrics-port", "70000"], "--metrics-port"),
        (["gateway", "--health-port", "65536"], "--health-port"),
        (["demo", "--gateway-port", "65536"], "--gateway-port"),
        (["inject", "serve", "--cert", "c", "--key", "k", "--port", "70000"], "--port"),
    ],
)
def test_ports_out_of_range_are_refused(args: list[str], option: str) -> None:
    # serve --xds-port 70000 listened on 4464 (70000 - 65536) without a word
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output


def test_tail_lines_keep_one_word_per_field() -> None:
    # a CONNECT to an unknown destination printed "researcher ->  CONNECT": awk's destination
    # column became the method
    import datetime as dt

    from meshgate.audit.record import AuditRecord
    from meshgate.cli.audit_render import line

    record = AuditRecord(
        dt.datetime(2026, 12, 1, 16, 12, tzinfo=dt.UTC),
        "id-1",
        "researcher",
        "",
        "",
        "example.com:443",
        "CONNECT",
        "",
        403,
        "denied",
        "unknown_destination",
        57,
        0,
        0.2,
        "v1",
        "gateway/local",
    )
    words = line(record).split(" ")
    assert words[1:5] == ["researcher", "->", "-", "CONNECT"]


@pytest.fixture
def not_meshgate(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server answering `{}` to everything: a wrong --admin port (another JSON API)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = tmp_path / "token"
    token.write_text("t" * 43)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", token
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (["status", "--admin"], "/status"),
        (["identity", "show", "--agent", "coder", "--admin"], "/v1/identity/coder"),
        (["budget", "status", "--admin"], "/v1/budgets"),
        (["ca", "rotate", "--admin"], "/v1/ca/rotate"),
        (["audit", "query", "--control-plane"], "/v1/audit"),
        (["audit", "summary", "--control-plane"], "/v1/audit/summary"),
    ],
)
def test_json_that_is_not_a_control_planes_is_one_line(
    args: list[str], path: str, not_meshgate: tuple[str, Path]
) -> None:
    # each of these ended in a KeyError traceback
    url, token = not_meshgate
    result = runner.invoke(app, [*args, url, "--admin-token-file", str(token)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"error: {url}{path} answered JSON without" in result.output
    assert "is this a meshgate control plane's admin URL?" in result.output


def test_sidecar_run_refuses_a_mistyped_option_instead_of_running_it(tmp_path: Path) -> None:
    # `--proxyport 5 -- CMD` started the sidecar, then "cannot run '--proxyport'"
    state = ["--state-dir", str(tmp_path)]
    result = runner.invoke(
        app, ["sidecar", "run", "--agent", "a", *state, "--proxyport", "5", "--", "true"]
    )
    assert result.exit_code == 1, result.output
    assert "no such option: --proxyport" in result.output
    assert not any(tmp_path.iterdir())  # nothing started


def test_sidecar_run_leaves_cmd_options_to_cmd(monkeypatch: pytest.MonkeyPatch) -> None:
    # without `--`, `CMD --proxy-port 5` gave --proxy-port to the sidecar and ran bare CMD
    import meshgate.sidecar.launcher as launcher

    seen: list[tuple[list[str], int]] = []

    async def run_sidecar(
        agent: str,
        instance: str,
        cp: str,
        state: Path,
        command: list[str],
        stop: object,
        *args: object,
        proxy_port: int = 0,
        **kwargs: object,
    ) -> int:
        seen.append((command, proxy_port))
        return 0

    monkeypatch.setattr(launcher, "run_sidecar", run_sidecar)
    args = ["sidecar", "run", "--agent", "a", "--insecure-same-user", "echo", "--proxy-port", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == [(["echo", "--proxy-port", "5"], 0)]


def test_an_audit_store_from_the_environment_is_named_as_such(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # "no audit log at X (... or pass --store)" for a path the user never typed
    monkeypatch.setenv("MESHGATE_AUDIT_STORE", str(tmp_path / "gone.db"))
    result = runner.invoke(app, ["audit", "query"])
    assert result.exit_code == 1
    assert f"error: $MESHGATE_AUDIT_STORE: no audit log at {tmp_path / 'gone.db'}" in result.output
    given = runner.invoke(app, ["audit", "query", "--store", str(tmp_path / "typed.db")])
    assert "MESHGATE_AUDIT_STORE" not in given.output


def test_up_refuses_a_gateway_whose_listener_envoy_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `demo --gateway-port P` with P taken: Envoy says ready (it NACKs the listener), so `up`
    # and `demo` printed "is up" and agents got connection refused
    import json

    import httpx

    events: list[str] = []
    dump = {
        "configs": [
            {"name": "egress-http", "error_state": {"details": "cannot bind '127.0.0.1:15001'"}},
            {"error_state": {"details": "cannot bind '127.0.0.1:15001'"}},
        ]
    }

    class FakeAdmin:
        def get(self, path: str, timeout: float = 2.0) -> httpx.Response:
            assert path.startswith("/config_dump?resource=dynamic_listeners")
            return httpx.Response(200, content=json.dumps(dump))

    class FakeGateway:
        admin = FakeAdmin()

        async def start(self) -> None:
            events.append("envoy started")

        async def wait_ready(self, timeout: float = 30.0) -> None:
            events.append("envoy ready")

        async def stop(self) -> None:
            events.append("envoy stopped")

    class FakePacer:
        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

    import meshgate.sidecar.launcher as launcher

    monkeypatch.setattr(launcher, "prepare_gateway", lambda *a, **k: FakeGateway())
    monkeypatch.setattr(gateway, "_pacer", lambda *a: FakePacer())

    async def start() -> Any:
        return await gateway.start_gateway("127.0.0.1:1", "local", tmp_path, False, 1, True)

    with pytest.raises(EnvoyError) as caught:
        asyncio.run(start())
    assert "listener did not start: cannot bind '127.0.0.1:15001' (the Mesh" in str(caught.value)
    assert events == ["envoy started", "envoy ready", "envoy stopped"]
    dump["configs"] = [{"name": "egress-http"}]  # accepted: no error_state
    assert gateway.rejected_listeners(FakeAdmin()) == []


def test_retain_refuses_cutoffs_that_delete_what_is_not_old(tmp_path: Path) -> None:
    # `--retain 0s` and `--older-than 2099-01-01` deleted the whole audit log
    import datetime as dt

    from meshgate.audit.record import AuditRecord
    from meshgate.audit.sqlite_store import SqliteAuditStore

    db = tmp_path / "audit.db"
    store = SqliteAuditStore(str(db))
    now = dt.datetime.now(dt.UTC)
    store.append(
        [
            AuditRecord(
                now, "r1", "a", "", "d", "h", "GET", "/", 200, "allowed", "", 0, 0, 1.0, "v", "g"
            )
        ]
    )
    store.close()
    for args, message in (
        (["--retain", "0s"], "--retain: '0s' must be longer than zero"),
        (["--older-than", "2099-01-01"], "--older-than 2099-01-01: in the future"),
    ):
        result = runner.invoke(app, ["audit", "retain", "--store", str(db), *args])
        assert result.exit_code == 1, result.output
        assert message in result.output
    kept = runner.invoke(app, ["audit", "verify", "--store", str(db)])
    assert "intact: 1 records" in kept.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gateway", "--name", "Bad_Name", "STATE"], "--name 'Bad_Name': use lower-case letters"),
        (["token", "create", "--gateway", "a/b", "STATE"], "--gateway 'a/b': use lower-case"),
        (
            ["sidecar", "run", "--agent", "coder", "--instance", "a b", "STATE", "--", "true"],
            "--instance 'a b': use letters, digits",
        ),
    ],
)
def test_node_names_the_control_plane_refuses_are_refused_at_once(
    args: list[str], message: str, tmp_path: Path
) -> None:
    # the gateway said "running" while every xDS connect was refused (INVALID_ARGUMENT, only in
    # its Envoy log); the sidecar waited 30 s; the token named a node that cannot exist
    state = args.index("STATE")
    result = runner.invoke(app, [*args[:state], "--state-dir", str(tmp_path), *args[state + 1 :]])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert not any(tmp_path.iterdir())

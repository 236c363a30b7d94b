"""`meshgate demo`'s pieces: its policy passes the checks a policy repository's CI runs, its
provider stand-in answers only the key the gateway holds, its TLS is verifiable for exactly its
two host names, and the commands it prints carry only the flags a reader needs."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat
from pathlib import Path

import openai
import pytest
from typer.testing import CliRunner

from meshgate.cli import app
from meshgate.cli.demo import _next_steps
from meshgate.demo.llm_provider import LlmProvider
from meshgate.demo.policy import KEY_SECRET, new_provider_key, write_policy
from meshgate.demo.standins import start_standins


def test_the_demo_policy_validates_and_lints_clean(tmp_path: Path) -> None:
    key = new_provider_key()
    policies = write_policy(tmp_path, 15001, 40001, 40002, key)
    (policies / "ca" / "upstream-ca.pem").write_text("")  # start_standins writes the real one
    runner = CliRunner()
    done = runner.invoke(app, ["validate", str(policies)])
    assert done.exit_code == 0, done.output
    assert "2 agents, 2 destinations" in done.output
    done = runner.invoke(app, ["lint", str(policies)])
    assert done.exit_code == 0 and "0 findings, 0 errors" in done.output, done.output
    secret = policies / "secrets" / KEY_SECRET
    assert secret.read_text() == key and stat.S_IMODE(secret.stat().st_mode) == 0o600
    destinations = (policies / "destinations.yaml").read_text()
    assert "address: 127.0.0.1:40001" in destinations and "address: 127.0.0.1:40002" in destinations
    assert key not in destinations + (policies / "agents.yaml").read_text()
    assert new_provider_key() != key


async def test_the_provider_answers_only_its_key() -> None:
    provider = LlmProvider(reply_tokens=2, api_key="sk-right")
    port = await provider.start()
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wrong = openai.AsyncOpenAI(base_url=base, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        right = openai.AsyncOpenAI(base_url=base, api_key="sk-right", max_retries=0)
        done = await right.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
        assert done.choices[0].message.content == "ok ok"
        await wrong.close()
        await right.close()
    finally:
        await provider.stop()


def _handshake(port: int, name: str, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            with ctx.wrap_socket(sock, server_hostname=name):
                return "ok"
        except ssl.SSLError as exc:
            return type(exc).__name__


async def test_the_stand_ins_serve_tls_for_their_host_names_only(tmp_path: Path) -> None:
    seen: list[str] = []
    standins = await start_standins(tmp_path / "ca", tmp_path / "keys", "sk-k", seen.append)
    ca = tmp_path / "ca" / "upstream-ca.pem"
    try:
        for port in (standins.llm_port, standins.mcp_port):
            for name in ("api.openai.com", "mcp.demo.example"):
                assert await asyncio.to_thread(_handshake, port, name, ca) == "ok"
            failed = await asyncio.to_thread(_handshake, port, "evil.example", ca)
            assert failed == "SSLCertVerificationError"
    finally:
        await standins.stop()
    # the CA's key was never written: nothing else can be signed with it
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["upstream-ca.pem"]
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["cert.pem", "key.pem"]
    assert stat.S_IMODE((tmp_path / "keys" / "key.pem").stat().st_mode) == 0o600


def test_the_printed_commands_carry_only_the_flags_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = _next_steps(Path(".meshgate"), 18000)
    assert "--control-plane" not in plain and "--state-dir" not in plain
    assert "sidecar run --agent researcher -- " in plain and "demo/agent_openai.py" in plain
    assert "sidecar run --agent coder -- " in plain and "demo/agent_mcp.py" in plain
    assert "--insecure" not in plain
    other = _next_steps(Path("/tmp/st"), 4242)
    assert "--control-plane 127.0.0.1:4242 --state-dir /tmp/st --" in other
    assert "audit query --state-dir /tmp/st" in other
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "  sudo " in _next_steps(Path(".meshgate"), 18000)


def test_without_the_demo_extras_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys

    def never(*_: object) -> None:
        raise AssertionError("the demo started without its extras")

    # meshgate.cli.serve the attribute is the command; the module is in sys.modules
    monkeypatch.setattr(sys.modules["meshgate.cli.serve"], "_start_control_plane", never)
    for name in [n for n in sys.modules if n == "mcp" or n.startswith("mcp.")]:
        monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]
    for name in ("meshgate.demo.standins", "meshgate.demo.mcp_server"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # imported again, without mcp
    done = CliRunner().invoke(app, ["demo", "--state-dir", str(tmp_path / "state")])
    assert done.exit_code == 1
    assert done.stderr == (
        "error: meshgate demo needs the demo extras (mcp is missing): pip install -e '.[demo]'\n"
    )
    assert not (tmp_path / "state").exists()

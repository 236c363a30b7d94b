"""Duration options of the CLI go through meshgate.durations: same grammar, one-line errors."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest
from typer.testing import CliRunner

from meshgate.cli import app
from meshgate.identity.tokens import TokenAuthority

runner = CliRunner()


def test_token_ttl_accepts_the_shared_grammar(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["token", "create", "--agent", "coder", "--ttl", "1.5h", "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    TokenAuthority(tmp_path).verify(token)
    data = jwt.decode(token, options={"verify_signature": False})
    assert data["exp"] - data["iat"] == 5400


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["token", "create", "--agent", "a", "--ttl", "10x"], "--ttl: '10x' has an unknown unit"),
        (["token", "create", "--agent", "a", "--ttl", "0m"], "--ttl: '0m' must be longer than"),
        (["token", "create", "--agent", "a", "--ttl", "1.5s"], "--ttl: '1.5s' is not a whole"),
        (
            [
                "serve",
                "--ca",
                "vault",
                "--vault-address",
                "http://127.0.0.1:1",
                "--vault-intermediate-ttl",
                "soon",
            ],
            "--vault-intermediate-ttl: 'soon' is not a duration",
        ),
        (["audit", "retain", "--retain", "30"], "--retain: '30' needs a unit"),
    ],
)
def test_bad_duration_is_one_line_naming_the_option(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(app, [*args, "--state-dir", str(tmp_path)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1

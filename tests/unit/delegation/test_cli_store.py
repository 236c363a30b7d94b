"""`meshgate serve --delegation-store`: a store that cannot be used stops the start with one
line naming it (never its password), not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshgate.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("mysql://u:hunter2@db/x", "error: delegation store 'mysql://u:***@db/x': use postgresql"),
        (
            "postgresql://u:hunter2@127.0.0.1:1/x?connect_timeout=2",
            "error: cannot connect to the delegation store 127.0.0.1:1/x:",
        ),
    ],
)
def test_a_bad_delegation_store_is_one_line(tmp_path: Path, store: str, message: str) -> None:
    (tmp_path / "policies").mkdir()
    args = ["serve", "--policies", str(tmp_path / "policies"), "--state-dir", str(tmp_path / "s")]
    args += ["--xds-port", "0", "--admin-port", "0", "--delegation-store", store]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.output

"""The command tree: every command is still there, and every --format comes from cli/output.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from meshgate.cli import app
from meshgate.cli.output import Format, FormatChoice
from meshgate.identity.agent_trust import AgentTrustCA, ca_cert_path

runner = CliRunner()


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = dict(_commands(typer.main.get_command(app)))
WITH_FORMAT = {
    path: next(p for p in command.params if "--format" in p.opts)
    for path, command in COMMANDS.items()
    if any("--format" in p.opts for p in command.params)
}


def test_every_command_is_there() -> None:
    assert {" ".join(path) for path in COMMANDS} == {
        "serve", "gateway", "up", "demo", "status", "validate", "plan", "lint",
        "audit query", "audit tail", "audit summary", "audit verify", "audit retain",
        "sidecar run", "identity show", "ca rotate", "ca agent-trust", "token create",
        "token revoke",
        "inject serve", "inject pod", "budget status",
    }  # fmt: skip


def test_every_format_option_takes_its_choices_from_output() -> None:
    assert {" ".join(path) for path in WITH_FORMAT} == {
        "status", "plan", "lint", "identity show", "token create",
        "audit query", "audit tail", "audit summary", "audit verify", "budget status",
    }  # fmt: skip
    for path, param in WITH_FORMAT.items():
        info = param.type_descriptor
        parser = info.parameter_info.parser
        assert info.annotation is Format, path
        assert isinstance(parser, FormatChoice), path
        assert parser.formats and all(isinstance(f, Format) for f in parser.formats), path
        assert param.default in parser.formats, path
        assert param.metavar == f"<{'|'.join(parser.formats)}>", path


@pytest.mark.parametrize("path", sorted(WITH_FORMAT), ids=" ".join)
def test_a_format_not_offered_is_one_line(path: tuple[str, ...]) -> None:
    command = COMMANDS[path]
    offered = WITH_FORMAT[path].type_descriptor.parameter_info.parser.formats
    # --format first: it is refused before any required option or argument is looked at
    result = runner.invoke(app, [*path, "--format", "xml"])
    assert result.exit_code == 1, (command, result.output)
    assert result.stdout == ""
    assert result.stderr == f"error: --format must be one of {', '.join(offered)}, got 'xml'\n"


@pytest.mark.parametrize("path", sorted(WITH_FORMAT), ids=" ".join)
def test_every_format_option_has_the_short_alias_o(path: tuple[str, ...]) -> None:
    assert WITH_FORMAT[path].opts == ["--format", "-o"]
    result = runner.invoke(app, [*path, "-o", "xml"])
    assert result.exit_code == 1 and "--format must be one of" in result.stderr


def test_an_offered_format_parses_to_the_enum() -> None:
    choice = FormatChoice((Format.TEXT, Format.JSON))
    assert choice("json") is Format.JSON
    assert choice(Format.TEXT) is Format.TEXT


def test_ca_agent_trust_prints_the_certificate_never_the_key(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["ca", "agent-trust", "--state-dir", str(tmp_path)])
    assert missing.exit_code == 1 and "no agent-trust CA yet" in missing.output
    AgentTrustCA.load_or_create(tmp_path)
    done = runner.invoke(app, ["ca", "agent-trust", "--state-dir", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert done.output == ca_cert_path(tmp_path).read_text()
    assert "PRIVATE KEY" not in done.output

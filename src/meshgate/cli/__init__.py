"""The `meshgate` command. The I/O edge: every expected failure becomes one line, exit 1.

One module per command group; shared options in `options`, output formats in `output`, the
process edge (failures, logging, signals) in `common`, admin API calls in `admin`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from meshgate.cli.audit import audit_app
from meshgate.cli.budget import budget_app
from meshgate.cli.demo import demo
from meshgate.cli.gateway import gateway
from meshgate.cli.identity import ca_app, identity_app, token_app
from meshgate.cli.inject import inject_app
from meshgate.cli.output import err_console
from meshgate.cli.policy import lint, plan, validate
from meshgate.cli.serve import serve, up
from meshgate.cli.sidecar import sidecar_app
from meshgate.cli.status import status
from meshgate.errors import MeshgateError

app = typer.Typer(
    help="meshgate: egress and identity control plane for AI agents, on real Envoy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (serve, gateway, up, demo, status, validate, plan, lint):
    app.command()(command)
app.add_typer(audit_app, name="audit")
app.add_typer(budget_app, name="budget")
app.add_typer(sidecar_app, name="sidecar")
app.add_typer(identity_app, name="identity")
app.add_typer(ca_app, name="ca")
app.add_typer(token_app, name="token")
app.add_typer(inject_app, name="inject")


def main() -> None:
    try:
        app()
    except MeshgateError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(1)
    except OSError as exc:  # a path the user gave that is not what it must be (--state-dir FILE)
        err_console.print(f"error: {_os_error(exc)}", highlight=False, markup=False)
        sys.exit(1)


def _os_error(exc: OSError) -> str:
    if not exc.filename:
        return str(exc)
    path = Path(os.fsdecode(exc.filename))
    if isinstance(exc, FileExistsError) and not path.is_dir():  # mkdir(exist_ok=True) on a file
        return f"{path}: exists and is not a directory"
    return f"{path}: {exc.strerror or exc}"


__all__ = ["app", "main"]

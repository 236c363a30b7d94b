"""`meshgate validate`, `plan` and `lint`: a policy directory checked before it is served."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from meshgate.cli import admin
from meshgate.cli.common import fail
from meshgate.cli.options import (
    DEFAULT_ADMIN,
    DEFAULT_STATE,
    AdminTokenFileOpt,
    StateOpt,
    TextOrJsonOpt,
)
from meshgate.cli.output import Format, console, err_console, print_json

PolicyDirArg = Annotated[Path, typer.Argument(help="Policy directory.")]


def _load_dir(directory: Path) -> Any:
    """The directory's model and sources; its problems, one per line, and exit 1 if invalid."""
    from meshgate.errors import PolicyError
    from meshgate.policy.loader import load_policy_dir_with_locations

    try:
        return load_policy_dir_with_locations(directory)
    except PolicyError as exc:
        for problem in exc.problems:
            err_console.print(problem, highlight=False, markup=False)
        n = len(exc.problems)
        err_console.print(f"[red]{n} problem{'s' if n != 1 else ''}[/red] in {directory}")
        raise typer.Exit(1) from None


def validate(directory: PolicyDirArg) -> None:
    """Check a policy directory; print every problem as file:line:col: message."""
    loaded = _load_dir(directory)
    m = loaded.model
    console.print(
        f"[green]valid[/green]: {len(m.agents)} agents, {len(m.destinations)} destinations, "
        f"version {m.version}"
    )


def plan(
    directory: PolicyDirArg,
    admin_url: Annotated[
        str, typer.Option("--admin", help="Running control plane to diff against.")
    ] = DEFAULT_ADMIN,
    against: Annotated[
        Path | None, typer.Option(help="Diff against this policy directory instead (offline).")
    ] = None,
    format: TextOrJsonOpt = Format.TEXT,
    admin_token_file: AdminTokenFileOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Show what applying DIRECTORY would change versus what the control plane serves."""
    from meshgate.errors import PolicyError
    from meshgate.policy.plan import diff_policies, plan_to_json, render_plan_text
    from meshgate.policy.serialize import model_from_json

    new = _load_dir(directory).model
    if against is not None:
        old = _load_dir(against).model
    else:
        client = admin.connect(admin_url, admin_token_file, state_dir, timeout=5)
        data = admin.call(client, "GET", "/v1/policy").body
        if "error" in data:
            old = None
        else:
            try:
                old = model_from_json(data)
            except PolicyError as exc:
                raise fail(f"control plane sent an unreadable policy: {exc}") from None
    result = diff_policies(old, new)
    if format is Format.JSON:
        print_json(plan_to_json(result))
    else:
        console.print(render_plan_text(result), highlight=False, markup=False)


def lint(
    directory: PolicyDirArg,
    config: Annotated[
        Path | None,
        typer.Option(help="Lint config YAML (default: DIRECTORY/.meshgate-lint.yaml if present)."),
    ] = None,
    format: TextOrJsonOpt = Format.TEXT,
) -> None:
    """Apply the platform team's guardrails (MG001...); exit 1 on any error-level finding."""
    from meshgate.policy.lint import has_errors, lint_policy, load_lint_config

    loaded = _load_dir(directory)
    cfg = load_lint_config(config or directory / ".meshgate-lint.yaml")
    if config is not None and not config.exists():
        raise fail(f"{config}: lint config not found")
    findings = lint_policy(loaded.model, cfg, loaded.sources)
    if format is Format.JSON:
        print_json([f.__dict__ for f in findings])
    else:
        for finding in findings:
            style = "red" if finding.severity == "error" else "yellow"
            console.print(f"[{style}]{finding}[/{style}]", highlight=False)
        errors = sum(f.severity == "error" for f in findings)
        console.print(f"{len(findings)} findings, {errors} errors")
    if has_errors(findings):
        raise typer.Exit(1)

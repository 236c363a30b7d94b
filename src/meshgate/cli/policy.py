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
    StoreOpt,
    TextOrJsonOpt,
    UntilOpt,
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


PlanPolicyArg = Annotated[
    str,
    typer.Argument(
        metavar="POLICY",
        help="Policy directory. With --replay also a git ref of this repository "
        "(REF or REF:DIR) or a git source (git+URL@ref#dir).",
    ),
]


def plan(
    directory: PlanPolicyArg,
    admin_url: Annotated[
        str, typer.Option("--admin", help="Running control plane to diff against.")
    ] = DEFAULT_ADMIN,
    against: Annotated[
        Path | None, typer.Option(help="Diff against this policy directory instead (offline).")
    ] = None,
    format: TextOrJsonOpt = Format.TEXT,
    admin_token_file: AdminTokenFileOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    replay: Annotated[
        bool,
        typer.Option(
            "--replay",
            help="Evaluate POLICY's gateway routes on the recorded audit traffic instead: which "
            "requests would be newly refused or allowed. Exit 0: none newly refused; 2: some "
            "newly refused; 1: error.",
        ),
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="With --replay: exit 2 also when a request's answer depends on a header the "
            "audit records do not hold (a rule's `headers:`).",
        ),
    ] = False,
    since: Annotated[
        str, typer.Option(help="With --replay: records from this time (7d, 24h or ISO 8601).")
    ] = "7d",
    until: UntilOpt = None,
    store: StoreOpt = None,
) -> None:
    """Show what applying POLICY would change versus what the control plane serves, or with
    --replay, what it would change for the requests agents actually made."""
    from meshgate.errors import PolicyError
    from meshgate.policy.plan import diff_policies, plan_to_json, render_plan_text
    from meshgate.policy.serialize import model_from_json

    if replay:
        if against is not None:
            raise fail("--against does not apply to --replay: it compares with what was recorded")
        _replay(directory, since, until, store, state_dir, format, strict)
        return
    new = _load_dir(Path(directory)).model
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


def _replay(
    spec: str,
    since: str,
    until: str | None,
    store: str | None,
    state_dir: Path,
    format: Format,
    strict: bool,
) -> None:
    """`plan --replay`: the report, and an exit code a CI check can gate on."""
    import sqlite3
    import time

    from meshgate.audit.open import store_target
    from meshgate.audit.query import parse_instant
    from meshgate.errors import MeshgateError, PolicyError
    from meshgate.replay.candidate import load_candidate
    from meshgate.replay.compare import replay, report_json, report_text
    from meshgate.replay.records import read_groups, to_groups
    from meshgate.replay.routes import PolicyRoutes, UnsupportedMatch

    try:
        model = load_candidate(spec, state_dir)
    except PolicyError as exc:
        for problem in exc.problems:
            err_console.print(problem, highlight=False, markup=False)
        raise fail(f"{spec}: not a valid policy") from None
    try:
        start = parse_instant(since, "--since")
        end = parse_instant(until, "--until") if until else None
        started = time.monotonic()
        grouped = read_groups(store_target(store, state_dir), start, end)
        report = replay(to_groups(grouped), PolicyRoutes(model), start.isoformat(), strict)
    except UnsupportedMatch as exc:
        raise fail(f"replay cannot evaluate the generated routes: {exc}") from None
    except (MeshgateError, sqlite3.Error) as exc:
        raise fail(str(exc)) from None
    elapsed = time.monotonic() - started
    if format is Format.JSON:
        print_json({"candidate": spec, **report_json(report), "seconds": round(elapsed, 3)})
    else:
        console.print(report_text(report), highlight=False, markup=False)
        err_console.print(f"replayed in {elapsed:.1f}s", highlight=False)
    raise typer.Exit(report.exit_code)


def lint(
    directory: PolicyDirArg,
    config: Annotated[
        Path | None,
        typer.Option(help="Lint config YAML (default: DIRECTORY/.meshgate-lint.yaml if present)."),
    ] = None,
    format: TextOrJsonOpt = Format.TEXT,
) -> None:
    """Apply the platform team's guardrails (MG001...); exit 1 on any error-level finding."""
    from meshgate.errors import ConfigError
    from meshgate.policy.lint import has_errors, lint_policy, load_lint_config

    loaded = _load_dir(directory)
    if config is not None and not config.exists():
        raise fail(f"{config}: lint config not found")
    config_path = config or directory / ".meshgate-lint.yaml"
    try:
        cfg = load_lint_config(config_path)
    except ConfigError as exc:  # name the file: "lint config: ..." alone does not say which
        message = str(exc).removeprefix("lint config: ")
        where = "" if message.startswith(str(config_path)) else f"{config_path}: "
        raise fail(f"{where}{message}") from None
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

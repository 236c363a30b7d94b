"""`meshgate sidecar run`: an agent's sidecar Envoy, and optionally the agent behind it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from meshgate.cli.common import fail, run_until_signal, setup_logging, warn_insecure
from meshgate.cli.options import (
    DEFAULT_STATE,
    DEFAULT_XDS,
    PORT_RANGE,
    ControlPlaneOpt,
    HealthPortOpt,
    InsecureNodeOpt,
    StateOpt,
    TokenFileOpt,
    XdsCaOpt,
    check_node_id,
)
from meshgate.cli.output import err_console
from meshgate.errors import MeshgateError

sidecar_app = typer.Typer(help="Agent sidecars.", no_args_is_help=True)


@sidecar_app.command(
    "run",
    # CMD's own options stay CMD's (`sidecar run --agent a curl --proxy x` passes --proxy to
    # curl, like `sudo` and `env`); an unknown option before CMD is refused below
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "allow_interspersed_args": False,
    },
)
def sidecar_run(
    ctx: typer.Context,
    agent: Annotated[str, typer.Option(help="Agent name; identity of everything it sends.")],
    control_plane: ControlPlaneOpt = DEFAULT_XDS,
    health_port: HealthPortOpt = None,
    instance: Annotated[str, typer.Option(help="Instance id (node agent/NAME/ID).")] = "local",
    state_dir: StateOpt = DEFAULT_STATE,
    token_file: TokenFileOpt = None,
    xds_ca: XdsCaOpt = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Run CMD in its own network namespace whose only way out is the sidecar "
            "(needs root).",
        ),
    ] = False,
    user: Annotated[
        str | None,
        typer.Option(help="User CMD runs as (root launcher only; default nobody)."),
    ] = None,
    insecure_same_user: Annotated[
        bool,
        typer.Option(
            "--insecure-same-user",
            help="Run CMD as the launcher's own user, who can read the mesh's keys and tokens.",
        ),
    ] = False,
    proxy_port: Annotated[
        int,
        typer.Option(
            help="Loopback port of this sidecar's proxy (default: a free one).", **PORT_RANGE
        ),
    ] = 0,
    insecure: InsecureNodeOpt = False,
    agent_trust_ca: Annotated[
        Path | None,
        typer.Option(
            help="CA of the sidecar's HTTPS interception, added to CMD's trust "
            "(default: the local control plane's, in the state dir).",
        ),
    ] = None,
    trust_dir: Annotated[
        Path | None,
        typer.Option(
            help="Write CMD's CA bundle (system CAs + the agent-trust CA) here "
            "(default: a temporary directory; Kubernetes: a volume the pod shares).",
        ),
    ] = None,
) -> None:
    """Run AGENT's sidecar Envoy; with `-- CMD ARGS`, run CMD behind it and exit with its status.

    CMD never keeps a capability, and runs as another user than the sidecar (--user, default
    nobody, when run as root) so it cannot read the mesh's keys or forge its audit spool."""
    from meshgate.sidecar.agent_user import resolve_agent_user
    from meshgate.sidecar.launcher import run_sidecar

    setup_logging(False)
    check_node_id(
        f"agent/a/{instance}", "--instance", instance, "letters, digits, '.', '_' and '-' (1-128)"
    )
    command = list(ctx.args)
    if command and command[0].startswith("-"):  # a mistyped option would be run as CMD
        raise fail(
            f"no such option: {command[0]} (CMD goes after --: "
            "meshgate sidecar run --agent NAME -- CMD ARGS)"
        )
    result: list[int] = []
    agent_user = None
    if command:
        try:
            agent_user = resolve_agent_user(user, insecure_same_user)
        except MeshgateError as exc:
            raise fail(str(exc)) from None
        if insecure_same_user:
            err_console.print(
                f"[bold red]WARNING: --insecure-same-user[/bold red]: CMD runs as "
                f"{agent_user.name}, the sidecar's own user: it can read the mesh's keys and "
                "tokens and forge its audit spool. Never use this for an untrusted agent.",
                highlight=False,
            )
    elif user is not None or insecure_same_user:
        raise fail("--user and --insecure-same-user apply to a command: -- CMD ARGS")
    if insecure:
        warn_insecure("this sidecar takes its configuration over plaintext, unauthenticated xDS")

    async def main(stop: asyncio.Event) -> None:
        result.append(
            await run_sidecar(
                agent,
                instance,
                control_plane,
                state_dir,
                command,
                stop,
                token_file,
                xds_ca,
                strict=strict,
                health_port=health_port,
                user=agent_user,
                proxy_port=proxy_port,
                insecure=insecure,
                agent_trust_ca=agent_trust_ca,
                trust_dir=trust_dir,
            )
        )

    run_until_signal(main)
    raise typer.Exit(result[0] if result else 0)

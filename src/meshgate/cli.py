"""The `meshgate` command. The I/O edge: every expected failure becomes one line, exit 1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from meshgate.audit.cli import audit_app
from meshgate.errors import MeshgateError

if TYPE_CHECKING:  # imported lazily at run time: `meshgate --help` stays fast
    from meshgate.controlplane.server import ControlPlane, ServeOptions
    from meshgate.controlplane.vault_ca import VaultCASettings

app = typer.Typer(
    help="meshgate: egress and identity control plane for AI agents, on real Envoy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

DEFAULT_STATE = Path(".meshgate")
DEFAULT_ADMIN = "http://127.0.0.1:18001"

PoliciesOpt = Annotated[
    str, typer.Option("--policies", "-p", help="Policy directory, or git+URL@ref for a git repo.")
]
StateOpt = Annotated[Path, typer.Option(help="Directory for local state (CA, audit, bootstraps).")]
XdsPortOpt = Annotated[int, typer.Option(help="Port for the xDS gRPC server.")]
AdminPortOpt = Annotated[int, typer.Option(help="Port for the admin HTTP server.")]
HostOpt = Annotated[str, typer.Option(help="Address the control plane listens on.")]
TokenFileOpt = Annotated[
    Path | None,
    typer.Option(help="Join token file (default: minted from --state-dir when readable)."),
]
SidecarPortOpt = Annotated[
    int, typer.Option(help="Loopback proxy port of the injected sidecars (apps' HTTP_PROXY).")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v")]
HealthPortOpt = Annotated[
    int | None,
    typer.Option(
        help="Envoy answers GET /healthz/ready on 127.0.0.1:PORT (for outside probes; nothing "
        "else). Envoy's admin is a unix socket in the state dir, never a port."
    ),
]
InsecureServeOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="LAB ONLY: plaintext xDS without join tokens and no sidecar -> gateway mTLS. "
        "Anyone who reaches the xDS port reads every credential.",
    ),
]
InsecureNodeOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="LAB ONLY: talk plaintext, unauthenticated xDS to a `serve --insecure` plane.",
    ),
]
XdsCaOpt = Annotated[
    Path | None,
    typer.Option(help="CA bundle that verifies a TLS xDS port (default: the local one, if any)."),
]
# Vault PKI as the upstream CA. Credentials only from the environment: VAULT_TOKEN, or AppRole
# with VAULT_SECRET_ID (never on the command line, where `ps` would show them).
CaOpt = Annotated[
    str, typer.Option("--ca", help="Who signs the intermediate CA: builtin or vault.")
]
VaultAddressOpt = Annotated[
    str | None, typer.Option(envvar="VAULT_ADDR", help="Vault address (with --ca vault).")
]
VaultMountOpt = Annotated[str, typer.Option(help="Mount of Vault's PKI engine.")]
VaultNamespaceOpt = Annotated[str | None, typer.Option(envvar="VAULT_NAMESPACE")]
VaultRoleIdOpt = Annotated[
    str | None,
    typer.Option(envvar="VAULT_ROLE_ID", help="AppRole role id (secret id: env VAULT_SECRET_ID)."),
]
VaultTtlOpt = Annotated[
    str, typer.Option(help="Lifetime asked of Vault for the intermediate (renewed at 2/3).")
]
# the admin API's operator token (docs/admin-auth.md); the token itself never goes on a command line
ServeAdminTokenOpt = Annotated[
    Path | None,
    typer.Option(
        help="Admin API token file to require (default: created as STATE_DIR/admin/token)."
    ),
]
AdminTokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="File holding the control plane's admin token (default: $MESHGATE_ADMIN_TOKEN, "
        "else STATE_DIR/admin/token)."
    ),
]
AuditStoreOpt = Annotated[
    str | None,
    typer.Option(
        help="Audit store: a path, sqlite:///path or postgresql://... "
        "(default: $MESHGATE_AUDIT_STORE, else STATE_DIR/audit.db)."
    ),
]


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    return typer.Exit(1)


def _warn_insecure(what: str) -> None:
    err_console.print(
        f"[bold red]WARNING: --insecure[/bold red]: {what}. Never use this outside a lab.",
        highlight=False,
    )


INSECURE_SERVE = (
    "xDS is plaintext and needs no join token, and sidecars reach gateways without mTLS: "
    "any process that reaches the xDS port receives every credential and key"
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


def _vault_ca(
    ca: str, address: str | None, mount: str, namespace: str | None, role_id: str | None, ttl: str
) -> VaultCASettings | None:
    if ca == "builtin":
        return None
    if ca != "vault":
        raise _fail(f"--ca must be builtin or vault, got {ca!r}")
    if not address:
        raise _fail("--ca vault needs --vault-address (or env VAULT_ADDR)")
    from meshgate.controlplane.vault_ca import VaultCASettings

    try:
        seconds = parse_ttl(ttl)
    except MeshgateError as exc:
        raise _fail(str(exc).replace("--ttl", "--vault-intermediate-ttl")) from None
    return VaultCASettings(address, mount, namespace, role_id, seconds)


def _run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)`; SIGINT/SIGTERM set `stop` so everything shuts down in order."""

    async def runner() -> None:
        # nothing a long-running meshgate process writes (keys, tokens, audit store, spools,
        # logs) is for other users, agents above all
        os.umask(0o077)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(runner())
    except MeshgateError as exc:
        raise _fail(str(exc)) from None


async def _start_control_plane(policies: str, state_dir: Path, opts: ServeOptions) -> ControlPlane:
    from meshgate.controlplane.server import ControlPlane
    from meshgate.controlplane.sources import make_source
    from meshgate.sidecar.agent_user import private_dir

    private_dir(state_dir)
    cp = ControlPlane(make_source(policies, state_dir), state_dir, opts)
    await cp.start()
    return cp


@app.command()
def serve(
    policies: PoliciesOpt = "policies",
    state_dir: StateOpt = DEFAULT_STATE,
    host: HostOpt = "127.0.0.1",
    xds_port: XdsPortOpt = 18000,
    admin_port: AdminPortOpt = 18001,
    gateway_bind: Annotated[
        str, typer.Option(help="Address gateways bind their listener to (0.0.0.0 in a pod).")
    ] = "127.0.0.1",
    insecure: InsecureServeOpt = False,
    xds_cert: Annotated[Path | None, typer.Option(help="xDS serving certificate (PEM).")] = None,
    xds_key: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
    ca: CaOpt = "builtin",
    vault_address: VaultAddressOpt = None,
    vault_pki_mount: VaultMountOpt = "pki",
    vault_namespace: VaultNamespaceOpt = None,
    vault_role_id: VaultRoleIdOpt = None,
    vault_intermediate_ttl: VaultTtlOpt = "30d",
    gateway_address: Annotated[
        str | None,
        typer.Option(help="HOST:PORT sidecars send to (a gateway Service); default loopback."),
    ] = None,
    audit_store: AuditStoreOpt = None,
    admin_token_file: ServeAdminTokenOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the control plane only (xDS + admin HTTP + audit ingest), serving POLICIES."""
    from meshgate.controlplane.server import ServeOptions
    from meshgate.sidecar.launcher import parse_address

    _setup_logging(verbose)
    try:
        gateway_at = parse_address(gateway_address) if gateway_address else None
    except MeshgateError as exc:
        raise _fail(str(exc).replace("--control-plane", "--gateway-address")) from None
    if insecure:
        if xds_cert is not None or xds_key is not None or ca != "builtin":
            raise _fail("--insecure turns TLS and mTLS off: it excludes --xds-cert/--xds-key/--ca")
        _warn_insecure(INSECURE_SERVE)
    opts = ServeOptions(
        host,
        xds_port,
        host,
        admin_port,
        gateway_bind,
        require_tokens=not insecure,
        mtls=not insecure,
        xds_tls=not insecure,
        xds_cert_file=xds_cert,
        xds_key_file=xds_key,
        vault_ca=_vault_ca(
            ca,
            vault_address,
            vault_pki_mount,
            vault_namespace,
            vault_role_id,
            vault_intermediate_ttl,
        ),
        gateway_address=gateway_at,
        audit_store=audit_store or "",
        admin_token_file=admin_token_file,
    )

    async def main(stop: asyncio.Event) -> None:
        cp = await _start_control_plane(policies, state_dir, opts)
        try:
            await stop.wait()
        finally:
            await cp.stop()

    _run_until_signal(main)


@app.command()
def gateway(
    control_plane: Annotated[str, typer.Option(help="xDS address HOST:PORT.")] = "127.0.0.1:18000",
    name: Annotated[str, typer.Option(help="Gateway name; node id is gateway/NAME.")] = "local",
    health_port: HealthPortOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    delta: Annotated[bool, typer.Option(help="Use incremental (delta) xDS.")] = False,
    concurrency: Annotated[int, typer.Option(help="Envoy worker threads.")] = 1,
    token_file: TokenFileOpt = None,
    xds_ca: XdsCaOpt = None,
    insecure: InsecureNodeOpt = False,
    register_consul: Annotated[
        str | None,
        typer.Option(help="Register with this Consul agent (http(s)://HOST:PORT) while running."),
    ] = None,
    consul_token_file: Annotated[
        Path | None, typer.Option(help="File holding the Consul ACL token for registration.")
    ] = None,
    consul_ca_file: Annotated[
        Path | None, typer.Option(help="CA bundle for an https:// Consul address.")
    ] = None,
    consul_service: Annotated[str, typer.Option(help="Consul service name.")] = "meshgate-egress",
    advertise: Annotated[
        str, typer.Option(help="HOST:PORT applications reach the gateway listener on.")
    ] = "127.0.0.1:15001",
) -> None:
    """Run a real Envoy egress gateway bootstrapped to the control plane (foreground).

    It also ships the gateway's audit spool (STATE_DIR/gateway-NAME/) to the control plane."""
    _setup_logging(False)
    if insecure:
        _warn_insecure("this gateway takes its configuration, credentials included, over "
                       "plaintext, unauthenticated xDS")  # fmt: skip
    registration = (
        _consul_registration(
            register_consul,
            name,
            health_port,
            advertise,
            consul_service,
            consul_token_file,
            consul_ca_file,
        )
        if register_consul
        else None
    )

    async def main(stop: asyncio.Event) -> None:
        envoy = await _start_gateway(
            control_plane,
            name,
            state_dir,
            delta,
            concurrency,
            token_file=token_file,
            xds_ca=xds_ca,
            health_port=health_port,
            insecure=insecure,
        )
        registrar = None
        console.print(
            f"gateway [bold]gateway/{name}[/bold] running; Envoy admin on {envoy.admin.socket}",
            highlight=False,
        )
        try:
            if registration is not None:
                from meshgate.sidecar.consul_registration import ConsulRegistrar

                registrar = ConsulRegistrar(registration)
                registrar.start()
            await _wait_either(stop, envoy.wait())
        finally:
            if registrar is not None:  # leave the catalogue before Envoy goes away
                await registrar.stop()
            await envoy.stop()

    _run_until_signal(main)


def _consul_registration(
    address: str,
    name: str,
    health_port: int | None,
    advertise: str,
    service: str,
    token_file: Path | None,
    ca_file: Path | None,
) -> Any:
    """Check the --register-consul options (one-line errors) into a Registration."""
    from pydantic_core import PydanticCustomError

    from meshgate.policy import syntax
    from meshgate.sidecar.bootstrap import HEALTH_PATH
    from meshgate.sidecar.consul_registration import Registration

    try:
        address = syntax.consul_address(address)
    except PydanticCustomError as exc:
        raise _fail(f"--register-consul {address!r}: {exc.message()}") from None
    try:
        host, port = syntax.parse_address(advertise)
        syntax.consul_name(service)
    except PydanticCustomError as exc:
        raise _fail(f"--advertise {advertise!r} / --consul-service: {exc.message()}") from None
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise _fail(f"--consul-token-file {token_file}: cannot read: {exc}") from None
    if ca_file is not None and not address.startswith("https://"):
        raise _fail("--consul-ca-file needs an https:// --register-consul address")
    if health_port is None:
        raise _fail("--register-consul needs --health-port (Consul's HTTP check)")
    return Registration(
        consul=address,
        service_id=f"{service}-{name}",
        service=service,
        address=host,
        port=port,
        check_url=f"http://127.0.0.1:{health_port}{HEALTH_PATH}",
        token=token,
        ca_file=str(ca_file) if ca_file else None,
        meta=(("meshgate_node", f"gateway/{name}"),),
    )


async def _start_gateway(
    control_plane: str,
    name: str,
    state_dir: Path,
    delta: bool,
    concurrency: int,
    wait_ready: bool = False,
    token_file: Path | None = None,
    xds_ca: Path | None = None,
    health_port: int | None = None,
    insecure: bool = False,
) -> Any:
    """The gateway Envoy plus the shipper of its audit spool to the control plane."""
    from meshgate.sidecar.launcher import prepare_gateway

    gw = prepare_gateway(
        name,
        control_plane,
        state_dir,
        token_file,
        delta=delta,
        concurrency=concurrency,
        xds_ca=xds_ca,
        health_port=health_port,
        insecure=insecure,
    )
    await gw.start()
    if wait_ready:
        await gw.wait_ready()
    return gw


async def _wait_either(stop: asyncio.Event, other: Awaitable[Any]) -> None:
    stop_task = asyncio.ensure_future(stop.wait())
    other_task = asyncio.ensure_future(other)
    await asyncio.wait({stop_task, other_task}, return_when=asyncio.FIRST_COMPLETED)
    for task in (stop_task, other_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@app.command()
def up(
    policies: PoliciesOpt = "policies",
    state_dir: StateOpt = DEFAULT_STATE,
    xds_port: XdsPortOpt = 18000,
    admin_port: AdminPortOpt = 18001,
    insecure: InsecureServeOpt = False,
    ca: CaOpt = "builtin",
    vault_address: VaultAddressOpt = None,
    vault_pki_mount: VaultMountOpt = "pki",
    vault_namespace: VaultNamespaceOpt = None,
    vault_role_id: VaultRoleIdOpt = None,
    vault_intermediate_ttl: VaultTtlOpt = "30d",
    audit_store: AuditStoreOpt = None,
    admin_token_file: ServeAdminTokenOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Control plane and a local egress gateway in one command; Ctrl-C stops both."""
    from meshgate.controlplane.server import ServeOptions

    _setup_logging(verbose)
    if insecure:
        if ca != "builtin":
            raise _fail("--insecure turns mTLS off: it excludes --ca")
        _warn_insecure(INSECURE_SERVE)
    xds_tls = not insecure
    opts = ServeOptions(
        "127.0.0.1",
        xds_port,
        "127.0.0.1",
        admin_port,
        "127.0.0.1",
        require_tokens=not insecure,
        mtls=not insecure,
        xds_tls=xds_tls,
        vault_ca=_vault_ca(
            ca,
            vault_address,
            vault_pki_mount,
            vault_namespace,
            vault_role_id,
            vault_intermediate_ttl,
        ),
        audit_store=audit_store or "",
        admin_token_file=admin_token_file,
    )

    async def main(stop: asyncio.Event) -> None:
        cp = await _start_control_plane(policies, state_dir, opts)
        envoy = None
        try:
            envoy = await _start_gateway(
                f"127.0.0.1:{xds_port}",
                "local",
                state_dir,
                False,
                1,
                wait_ready=True,
                insecure=insecure,
            )
            model = cp.policy.model
            port = model.mesh.gateway_listen_port if model else "?"
            console.print(
                f"[green]meshgate is up[/green]: policy {cp.policy.to_json()['version']} from "
                f"{policies}\n  egress gateway  http://127.0.0.1:{port}  (Envoy admin "
                f"{envoy.admin.socket})\n  xDS             {cp.xds_address}"
                f"{' (TLS)' if xds_tls else ''}\n  admin/status    "
                f"http://{cp.admin_address}/status\nPress Ctrl-C to stop."
            )
            await _wait_either(stop, envoy.wait())
        finally:
            if envoy is not None:
                await envoy.stop()
            await cp.stop()
            console.print("meshgate stopped.")

    _run_until_signal(main)


def _admin_call(
    admin: str,
    method: str,
    path: str,
    token_file: Path | None,
    state_dir: Path,
    timeout: float = 5,
    where: str | None = None,
) -> Any:
    """(status, JSON body) from the admin API with the operator token; a missing or refused
    token, or an unreachable control plane (named as `where`, default the URL), is one line."""
    from meshgate.adminclient import AdminClient, AdminError, Unreachable, find_token

    try:
        client = AdminClient(admin, find_token(token_file, state_dir), timeout)
        answer = client.request(method, path)
    except Unreachable as exc:
        where = where or f"{admin.rstrip('/')}{path}"
        raise _fail(f"cannot reach the control plane at {where}: {exc.reason}") from None
    except AdminError as exc:
        raise _fail(str(exc)) from None
    return answer.status, answer.body


def _get_json(admin: str, path: str, token_file: Path | None, state_dir: Path) -> Any:
    return _admin_call(admin, "GET", path, token_file, state_dir)[1]


@app.command()
def status(
    admin: Annotated[str, typer.Option(help="Control plane admin URL.")] = DEFAULT_ADMIN,
    format: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    admin_token_file: AdminTokenFileOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Connected nodes, their identity, ACKed version per type, last NACK; policy state."""
    data = _get_json(admin, "/status", admin_token_file, state_dir)
    if format == "json":
        console.print_json(data=data)
        return
    if format != "table":
        raise _fail(f"--format must be table or json, got {format!r}")
    pol = data["policy"]
    console.print(
        f"[bold]policy[/bold] {pol['version'] or '-'} from {pol['source']} "
        f"({pol['agents']} agents, {pol['destinations']} destinations)"
    )
    if pol.get("missing_secrets"):
        names = ", ".join(pol["missing_secrets"])
        console.print(f"[yellow]missing secrets[/yellow] (their destinations answer 503): {names}")
    if data.get("ca"):
        ca = data["ca"]
        console.print(
            f"[bold]ca[/bold] {ca['source']}, intermediate {ca['intermediate_serial']} "
            f"valid until {ca['intermediate_not_after']}",
            highlight=False,
        )
    if pol.get("last_rejection"):
        rej = pol["last_rejection"]
        console.print(f"[red]last change refused[/red] ({rej['origin']}, {rej['at']}):")
        for problem in rej["problems"]:
            console.print(f"  {problem}", highlight=False, markup=False)
    _print_consul(data.get("consul") or [])
    table = Table("node", "identity", "proto", "cds", "eds", "lds", "rds", "sds", "NACK")
    nacks = []
    for node in data["nodes"]:
        cells = [_acked(node["types"].get(t)) for t in ("cds", "eds", "lds", "rds", "sds")]
        nack = node.get("last_nack")
        if nack:
            nacks.append(nack)
        table.add_row(
            node["node"], node["identity"], node["protocol"], *cells, "yes" if nack else ""
        )
    console.print(table)
    console.print("columns: version ACKed per type ('*' awaiting ACK of a newer one)")
    for nack in nacks:
        console.print(
            f"[red]NACK[/red] {nack['node']} {nack['type']} {nack['version']} at {nack['at']}: "
            f"{nack['message']}",
            highlight=False,
        )


def _print_consul(services: list[dict[str, Any]]) -> None:
    """Watched Consul services (issue 13): instances, index, last success and error."""
    if not services:
        return
    table = Table("consul service", "tag", "destinations", "instances", "index", "last success")
    errors = []
    for s in services:
        count = "?" if s["instances"] is None else str(s["instances"])
        cells = (
            s["service"],
            s["tag"] or "-",
            ",".join(s["destinations"]),
            count,
            s["index"] or "-",
            s["last_success_at"] or "never",
        )
        table.add_row(*(Text(c) for c in cells))  # plain text: a tag may contain "[...]"
        if s["last_error"]:
            errors.append(f"{s['service']}: {s['last_error']} ({s['last_error_at']})")
    console.print(table)
    for line in errors:
        console.print(Text.assemble(("consul error ", "red"), line), highlight=False)


def _acked(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    acked = str(entry.get("acked") or "-")
    short = acked.split("-")[0][:12] if acked != "-" else acked
    return f"{short}*" if entry.get("pending_ack") else short


app.add_typer(audit_app, name="audit")

sidecar_app = typer.Typer(help="Agent sidecars.", no_args_is_help=True)
app.add_typer(sidecar_app, name="sidecar")


@sidecar_app.command(
    "run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def sidecar_run(
    ctx: typer.Context,
    agent: Annotated[str, typer.Option(help="Agent name; identity of everything it sends.")],
    control_plane: Annotated[str, typer.Option(help="xDS address HOST:PORT.")] = "127.0.0.1:18000",
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
        int, typer.Option(help="Loopback port of this sidecar's proxy (default: a free one).")
    ] = 0,
    insecure: InsecureNodeOpt = False,
) -> None:
    """Run AGENT's sidecar Envoy; with `-- CMD ARGS`, run CMD behind it and exit with its status.

    CMD never keeps a capability, and runs as another user than the sidecar (--user, default
    nobody, when run as root) so it cannot read the mesh's keys or forge its audit spool."""
    from meshgate.sidecar.agent_user import resolve_agent_user
    from meshgate.sidecar.launcher import run_sidecar

    _setup_logging(False)
    command = list(ctx.args)
    result: list[int] = []
    agent_user = None
    if command:
        try:
            agent_user = resolve_agent_user(user, insecure_same_user)
        except MeshgateError as exc:
            raise _fail(str(exc)) from None
        if insecure_same_user:
            err_console.print(
                f"[bold red]WARNING: --insecure-same-user[/bold red]: CMD runs as "
                f"{agent_user.name}, the sidecar's own user: it can read the mesh's keys and "
                "tokens and forge its audit spool. Never use this for an untrusted agent.",
                highlight=False,
            )
    elif user is not None or insecure_same_user:
        raise _fail("--user and --insecure-same-user apply to a command: -- CMD ARGS")
    if insecure:
        _warn_insecure("this sidecar takes its configuration over plaintext, unauthenticated xDS")

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
            )
        )

    _run_until_signal(main)
    raise typer.Exit(result[0] if result else 0)


identity_app = typer.Typer(help="Workload identities.", no_args_is_help=True)
app.add_typer(identity_app, name="identity")


@identity_app.command("show")
def identity_show(
    agent: Annotated[str, typer.Option(help="Agent name.")],
    admin: Annotated[str, typer.Option(help="Control plane admin URL.")] = DEFAULT_ADMIN,
    format: Annotated[str, typer.Option("--format", help="text or json")] = "text",
    admin_token_file: AdminTokenFileOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """SPIFFE ID, current certificate (serial, expiry) and the rules that apply to AGENT."""
    data = _get_json(admin, f"/v1/identity/{agent}", admin_token_file, state_dir)
    if "error" in data:
        raise _fail(data["error"])
    if format == "json":
        console.print_json(data=data)
        return
    console.print(f"spiffe id    {data['spiffe_id']}", highlight=False)
    cert = data["certificate"]
    if cert:
        console.print(f"serial       {cert['serial']}", highlight=False)
        console.print(f"valid until  {cert['not_after']}", highlight=False)
    else:
        why = "no certificate issued yet" if data["mtls"] else "mTLS is off (serve --insecure)"
        console.print(f"certificate  none: {why}", highlight=False)
    if data.get("ca"):
        ca = data["ca"]
        console.print(
            f"issued by    {ca['source']} intermediate {ca['intermediate_serial']}, "
            f"valid until {ca['intermediate_not_after']}",
            highlight=False,
        )
    console.print("rules" + ("" if data["rules"] else "        none: every request is refused"))
    for rule in data["rules"]:
        console.print(f"  - {rule}", highlight=False, markup=False)


ca_app = typer.Typer(
    help="The certificate authority (built-in, or Vault PKI as upstream).", no_args_is_help=True
)
app.add_typer(ca_app, name="ca")


@ca_app.command("rotate")
def ca_rotate(
    admin: Annotated[str, typer.Option(help="Control plane admin URL.")] = DEFAULT_ADMIN,
    admin_token_file: AdminTokenFileOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Roll the intermediate CA with overlap: old certificates stay valid until replaced.

    With --ca vault, Vault's PKI engine signs the new intermediate now."""
    code, data = _admin_call(
        admin, "POST", "/v1/ca/rotate", admin_token_file, state_dir, timeout=30, where=admin
    )
    if code >= 400:
        raise _fail(data.get("error", f"HTTP {code}") if isinstance(data, dict) else f"HTTP {code}")
    console.print(f"new intermediate {data['intermediate_serial']}; certificates roll over now")


token_app = typer.Typer(help="Join tokens for authenticated xDS.", no_args_is_help=True)
app.add_typer(token_app, name="token")


def parse_ttl(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isdigit() or int(number) <= 0:
        raise MeshgateError(f"--ttl {text!r}: use a positive number with s, m, h or d (10m)")
    return int(number) * units[unit]


@token_app.command("create")
def token_create(
    agent: Annotated[str | None, typer.Option(help="Token for agent/NAME (any instance).")] = None,
    gateway_name: Annotated[
        str | None, typer.Option("--gateway", help="Token for gateway/NAME.")
    ] = None,
    ttl: Annotated[str, typer.Option(help="Lifetime: 30s, 10m, 12h, 7d.")] = "1h",
    state_dir: StateOpt = DEFAULT_STATE,
    format: Annotated[
        str, typer.Option("--format", help="token, or k8s-secret (a Secret manifest).")
    ] = "token",
    namespace: Annotated[
        str | None, typer.Option(help="Namespace of the k8s-secret (the agent pods').")
    ] = None,
) -> None:
    """Print a signed join token (JWT) for one node; its id is on stderr for revocation."""
    from meshgate.identity.tokens import TokenAuthority

    if (agent is None) == (gateway_name is None):
        raise _fail("give exactly one of --agent NAME or --gateway NAME")
    if format not in ("token", "k8s-secret"):
        raise _fail(f"--format must be token or k8s-secret, got {format!r}")
    if namespace is not None and format != "k8s-secret":
        raise _fail("--namespace applies to --format k8s-secret only")
    subject = f"agent/{agent}" if agent else f"gateway/{gateway_name}"
    token, claims = TokenAuthority(state_dir).create(subject, parse_ttl(ttl))
    if format == "k8s-secret":
        import yaml

        from meshgate.sidecar.injector import token_secret

        secret = token_secret(subject, token, claims.token_id, claims.expires_at, namespace)
        print(yaml.safe_dump(secret, sort_keys=False), end="")
    else:
        print(token)
    err_console.print(f"token id {claims.token_id} for {subject}, valid {ttl}", highlight=False)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The id printed by `token create`.")],
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Refuse this token from now on (new xDS streams)."""
    from meshgate.identity.tokens import TokenAuthority

    TokenAuthority(state_dir).revoke(token_id)
    console.print(f"revoked {token_id}")


inject_app = typer.Typer(help="Kubernetes sidecar injection.", no_args_is_help=True)
app.add_typer(inject_app, name="inject")

ImageOpt = Annotated[str, typer.Option(help="Image of the injected sidecar (has meshgate, envoy).")]
InjectCpOpt = Annotated[str, typer.Option(help="xDS address HOST:PORT the sidecars dial.")]
InjectHealthOpt = Annotated[
    int, typer.Option(help="Sidecar's loopback GET /healthz/ready port (its probes).")
]
InjectXdsCaOpt = Annotated[
    str,
    typer.Option(help="ConfigMap (key ca.crt) in the pod's namespace verifying the xDS port."),
]
InjectXdsTlsOpt = Annotated[
    bool, typer.Option(help="Sidecars verify a TLS xDS port; --no-xds-tls: plaintext (lab only).")
]


def _inject_settings(
    image: str,
    control_plane: str,
    sidecar_port: int,
    health_port: int,
    xds_ca_configmap: str,
    xds_tls: bool,
) -> Any:
    from meshgate.sidecar.injector import InjectSettings

    try:
        return InjectSettings(
            image,
            control_plane,
            sidecar_port,
            health_port,
            xds_ca_configmap=xds_ca_configmap if xds_tls else None,
        )
    except MeshgateError as exc:
        raise _fail(str(exc)) from None


@inject_app.command("serve")
def inject_serve(
    cert: Annotated[Path, typer.Option(help="TLS certificate (PEM) the API server verifies.")],
    key: Annotated[Path, typer.Option(help="Its private key (PEM).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="HTTPS port (POST /mutate, GET /healthz).")] = 8443,
    image: ImageOpt = "ghcr.io/meshgate/meshgate:0.1.0",
    control_plane: InjectCpOpt = "meshgate-control-plane.meshgate-system.svc:18000",
    sidecar_port: SidecarPortOpt = 15080,
    health_port: InjectHealthOpt = 15021,
    xds_ca_configmap: InjectXdsCaOpt = "meshgate-xds-ca",
    xds_tls: InjectXdsTlsOpt = True,
    verbose: VerboseOpt = False,
) -> None:
    """Run the mutating admission webhook that injects sidecars into labelled agent pods."""
    from meshgate.sidecar.webhook import serve_webhook

    settings = _inject_settings(
        image, control_plane, sidecar_port, health_port, xds_ca_configmap, xds_tls
    )
    _setup_logging(verbose)

    async def main(stop: asyncio.Event) -> None:
        await serve_webhook(settings, cert, key, host, port, stop)

    _run_until_signal(main)


@inject_app.command("pod")
def inject_pod(
    file: Annotated[
        Path, typer.Argument(help="Manifest YAML, several documents allowed; - is stdin.")
    ],
    image: ImageOpt = "ghcr.io/meshgate/meshgate:0.1.0",
    control_plane: InjectCpOpt = "meshgate-control-plane.meshgate-system.svc:18000",
    sidecar_port: SidecarPortOpt = 15080,
    health_port: InjectHealthOpt = 15021,
    xds_ca_configmap: InjectXdsCaOpt = "meshgate-xds-ca",
    xds_tls: InjectXdsTlsOpt = True,
) -> None:
    """Print FILE with labelled Pods (and pod templates) injected as the webhook would."""
    from meshgate.sidecar.injector import inject_manifests

    settings = _inject_settings(
        image, control_plane, sidecar_port, health_port, xds_ca_configmap, xds_tls
    )
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        print(inject_manifests(text, str(file), settings), end="")
    except MeshgateError as exc:
        raise _fail(str(exc)) from None


PolicyDirArg = Annotated[Path, typer.Argument(help="Policy directory.")]


def _load_dir(directory: Path) -> Any:
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


@app.command()
def validate(directory: PolicyDirArg) -> None:
    """Check a policy directory; print every problem as file:line:col: message."""
    loaded = _load_dir(directory)
    m = loaded.model
    console.print(
        f"[green]valid[/green]: {len(m.agents)} agents, {len(m.destinations)} destinations, "
        f"version {m.version}"
    )


@app.command()
def plan(
    directory: PolicyDirArg,
    admin: Annotated[str, typer.Option(help="Running control plane to diff against.")] = (
        DEFAULT_ADMIN
    ),
    against: Annotated[
        Path | None, typer.Option(help="Diff against this policy directory instead (offline).")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="text or json")] = "text",
    admin_token_file: AdminTokenFileOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Show what applying DIRECTORY would change versus what the control plane serves."""
    from meshgate.errors import PolicyError
    from meshgate.policy.plan import diff_policies, plan_to_json, render_plan_text
    from meshgate.policy.serialize import model_from_json

    if format not in ("text", "json"):
        raise _fail(f"--format must be text or json, got {format!r}")
    new = _load_dir(directory).model
    if against is not None:
        old = _load_dir(against).model
    else:
        data = _get_json(admin, "/v1/policy", admin_token_file, state_dir)
        if "error" in data:
            old = None
        else:
            try:
                old = model_from_json(data)
            except PolicyError as exc:
                raise _fail(f"control plane sent an unreadable policy: {exc}") from None
    result = diff_policies(old, new)
    if format == "json":
        console.print_json(data=plan_to_json(result))
    else:
        console.print(render_plan_text(result), highlight=False, markup=False)


@app.command()
def lint(
    directory: PolicyDirArg,
    config: Annotated[
        Path | None,
        typer.Option(help="Lint config YAML (default: DIRECTORY/.meshgate-lint.yaml if present)."),
    ] = None,
    format: Annotated[str, typer.Option("--format", help="text or json")] = "text",
) -> None:
    """Apply the platform team's guardrails (MG001...); exit 1 on any error-level finding."""
    from meshgate.policy.lint import has_errors, lint_policy, load_lint_config

    if format not in ("text", "json"):
        raise _fail(f"--format must be text or json, got {format!r}")
    loaded = _load_dir(directory)
    cfg = load_lint_config(config or directory / ".meshgate-lint.yaml")
    if config is not None and not config.exists():
        raise _fail(f"{config}: lint config not found")
    findings = lint_policy(loaded.model, cfg, loaded.sources)
    if format == "json":
        console.print_json(data=[f.__dict__ for f in findings])
    else:
        for finding in findings:
            style = "red" if finding.severity == "error" else "yellow"
            console.print(f"[{style}]{finding}[/{style}]", highlight=False)
        errors = sum(f.severity == "error" for f in findings)
        console.print(f"{len(findings)} findings, {errors} errors")
    if has_errors(findings):
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except MeshgateError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()

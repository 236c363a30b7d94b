"""`meshgate serve` (the control plane) and `meshgate up` (control plane plus a local gateway)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from meshgate.cli.common import (
    INSECURE_SERVE,
    fail,
    run_until_signal,
    setup_logging,
    wait_either,
    warn_insecure,
)
from meshgate.cli.gateway import start_gateway
from meshgate.cli.options import (
    DEFAULT_STATE,
    AdminPortOpt,
    AuditStoreOpt,
    CaOpt,
    InsecureServeOpt,
    LimitStoreOpt,
    LimitStorePasswordFileOpt,
    PoliciesOpt,
    ServeAdminTokenOpt,
    StateOpt,
    VaultAddressOpt,
    VaultMountOpt,
    VaultNamespaceOpt,
    VaultRoleIdOpt,
    VaultTtlOpt,
    VerboseOpt,
    XdsPortOpt,
)
from meshgate.cli.output import console
from meshgate.durations import DurationError, parse_seconds
from meshgate.errors import ConfigError, MeshgateError, PolicyError

if TYPE_CHECKING:  # imported lazily at run time: `meshgate --help` stays fast
    from meshgate.controlplane.server import ControlPlane, ServeOptions
    from meshgate.controlplane.vault_ca import VaultCASettings

HostOpt = Annotated[str, typer.Option(help="Address the control plane listens on.")]


def _vault_ca(
    ca: str, address: str | None, mount: str, namespace: str | None, role_id: str | None, ttl: str
) -> VaultCASettings | None:
    if ca == "builtin":
        return None
    if ca != "vault":
        raise fail(f"--ca must be builtin or vault, got {ca!r}")
    if not address:
        raise fail("--ca vault needs --vault-address (or env VAULT_ADDR)")
    from meshgate.controlplane.vault_ca import VaultCASettings

    try:
        seconds = parse_seconds(ttl, "--vault-intermediate-ttl", positive=True)
    except DurationError as exc:
        raise fail(str(exc)) from None
    return VaultCASettings(address, mount, namespace, role_id, seconds)


async def _start_control_plane(policies: str, state_dir: Path, opts: ServeOptions) -> ControlPlane:
    from meshgate.controlplane.collector import tune_collector
    from meshgate.controlplane.server import ControlPlane
    from meshgate.controlplane.sources import make_source
    from meshgate.sidecar.agent_user import private_dir

    private_dir(state_dir)
    cp = ControlPlane(make_source(policies, state_dir), state_dir, opts)
    await cp.start()
    tune_collector()  # once started: see controlplane/collector.py
    return cp


async def _first_policy(
    cp: ControlPlane, policies: str, stop: asyncio.Event, timeout: float = 60
) -> bool:
    """Wait until the first policy is served; False if stopped meanwhile. A refused first
    policy fails at once with its problems: there is nothing to start a gateway for (and a
    gateway would wait for configuration that never comes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while cp.policy.model is None and loop.time() < deadline:
        rejection = cp.policy.rejection
        if rejection is not None:
            raise PolicyError(
                [f"the policy in {policies} was refused, so there is nothing to serve:"]
                + [f"  {problem}" for problem in rejection.problems]
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
        if stop.is_set():
            return False
    return True


async def _gateway_port_free(cp: ControlPlane) -> None:
    """`up` runs one local gateway. Gateway replicas share their port (SO_REUSEPORT, as behind
    a load balancer), so a second `up` on this host would silently take a share of the first
    mesh's agents' connections: refuse it instead."""
    model = cp.policy.model
    if model is None:
        return
    port = model.mesh.gateway_listen_port
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
    except (OSError, TimeoutError):
        return  # nothing listens there
    writer.close()
    raise ConfigError(
        f"the Mesh's gateway port 127.0.0.1:{port} is taken (another meshgate up?): "
        f"stop it, or set another egressGateway.listenPort"
    )


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
    limit_store: LimitStoreOpt = None,
    limit_store_password_file: LimitStorePasswordFileOpt = None,
    admin_token_file: ServeAdminTokenOpt = None,
    delegation_port: Annotated[
        int,
        typer.Option(help="Port of the delegation endpoint gateways forward to (0: a free one)."),
    ] = 0,
    delegation_address: Annotated[
        str | None,
        typer.Option(help="HOST:PORT gateways reach the delegation endpoint at; default HOST."),
    ] = None,
    delegation_store: Annotated[
        str | None,
        typer.Option(
            envvar="MESHGATE_DELEGATION_STORE",
            help="Where sub-agents live: postgresql://...[?schema=NAME], shared by every "
            "control-plane replica (the audit store's database will do), or a directory "
            "(default: $MESHGATE_DELEGATION_STORE, else STATE_DIR/delegation: one replica).",
        ),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the control plane only (xDS + admin HTTP + audit ingest), serving POLICIES."""
    from meshgate.controlplane.server import ServeOptions
    from meshgate.sidecar.launcher import parse_address

    setup_logging(verbose)
    try:
        gateway_at = parse_address(gateway_address) if gateway_address else None
    except MeshgateError as exc:
        raise fail(str(exc).replace("--control-plane", "--gateway-address")) from None
    try:
        delegation_at = parse_address(delegation_address) if delegation_address else None
    except MeshgateError as exc:
        raise fail(str(exc).replace("--control-plane", "--delegation-address")) from None
    if insecure:
        if xds_cert is not None or xds_key is not None or ca != "builtin":
            raise fail("--insecure turns TLS and mTLS off: it excludes --xds-cert/--xds-key/--ca")
        warn_insecure(INSECURE_SERVE)
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
        limit_store=limit_store or "",
        limit_store_password_file=limit_store_password_file,
        admin_token_file=admin_token_file,
        delegation_host=host,
        delegation_port=delegation_port,
        delegation_address=delegation_at,
        delegation_store=delegation_store or "",
    )

    async def main(stop: asyncio.Event) -> None:
        cp = await _start_control_plane(policies, state_dir, opts)
        try:
            await stop.wait()
        finally:
            await cp.stop()

    run_until_signal(main)


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
    limit_store: LimitStoreOpt = None,
    limit_store_password_file: LimitStorePasswordFileOpt = None,
    admin_token_file: ServeAdminTokenOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Control plane and a local egress gateway in one command; Ctrl-C stops both."""
    from meshgate.controlplane.server import ServeOptions

    setup_logging(verbose)
    if insecure:
        if ca != "builtin":
            raise fail("--insecure turns mTLS off: it excludes --ca")
        warn_insecure(INSECURE_SERVE)
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
        limit_store=limit_store or "",
        limit_store_password_file=limit_store_password_file,
        admin_token_file=admin_token_file,
    )

    async def main(stop: asyncio.Event) -> None:
        cp = await _start_control_plane(policies, state_dir, opts)
        envoy = None
        try:
            if not await _first_policy(cp, policies, stop):
                return
            await _gateway_port_free(cp)
            envoy = await start_gateway(
                f"127.0.0.1:{cp.xds_address.rpartition(':')[2]}",  # the bound port (0 allowed)
                "local",
                state_dir,
                False,
                1,
                wait_ready=True,
                insecure=insecure,
                # with Redis, the local gateway counts there directly, like remote ones
                limit_store=limit_store,
                limit_store_password_file=limit_store_password_file,
            )
            model = cp.policy.model
            port = model.mesh.gateway_listen_port if model else "?"
            mtls = "" if insecure else " (mTLS only)"
            console.print(
                f"[green]meshgate is up[/green]: policy {cp.policy.to_json()['version']} from "
                f"{policies}\n  egress gateway  127.0.0.1:{port}{mtls}  (Envoy admin "
                f"{envoy.admin.socket})\n  xDS             {cp.xds_address}"
                f"{' (TLS)' if xds_tls else ''}\n  admin/status    "
                f"http://{cp.admin_address}/status\nPress Ctrl-C to stop."
            )
            await wait_either(stop, envoy.wait())
        finally:
            if envoy is not None:
                await envoy.stop()
            await cp.stop()
            console.print("meshgate stopped.")

    run_until_signal(main)

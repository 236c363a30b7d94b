"""`meshgate gateway`: a real Envoy egress gateway, optionally registered in Consul."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from meshgate.cli.common import fail, run_until_signal, setup_logging, wait_either, warn_insecure
from meshgate.cli.options import (
    DEFAULT_STATE,
    DEFAULT_XDS,
    NAME_CHARS,
    PORT_RANGE,
    ControlPlaneOpt,
    HealthPortOpt,
    InsecureNodeOpt,
    LimitStoreOpt,
    LimitStorePasswordFileOpt,
    StateOpt,
    TokenFileOpt,
    XdsCaOpt,
    check_node_id,
)
from meshgate.cli.output import console


def gateway(
    control_plane: ControlPlaneOpt = DEFAULT_XDS,
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
    limit_store: LimitStoreOpt = None,
    limit_store_password_file: LimitStorePasswordFileOpt = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve the pacer's Prometheus metrics on 127.0.0.1:PORT/metrics.", **PORT_RANGE
        ),
    ] = None,
    metrics_address: Annotated[
        str | None,
        typer.Option(
            callback=_check_metrics_address,
            metavar="IP:PORT",
            help="Serve the pacer's metrics on this address instead (e.g. the pod IP, for "
            "Prometheus). They name agents and budgets: let only the scraper reach it.",
        ),
    ] = None,
) -> None:
    """Run a real Envoy egress gateway bootstrapped to the control plane (foreground).

    It also ships the gateway's audit spool (STATE_DIR/gateway-NAME/) to the control plane."""
    setup_logging(False)
    check_node_id(f"gateway/{name}", "--name", name, NAME_CHARS)
    if metrics_port is not None and metrics_address is not None:
        raise fail("give --metrics-port (loopback) or --metrics-address, not both")
    metrics_host = "127.0.0.1"
    if metrics_address is not None:
        metrics_host, metrics_port = _metrics_address(metrics_address)
    if insecure:
        warn_insecure("this gateway takes its configuration, credentials included, over "
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
        envoy = await start_gateway(
            control_plane,
            name,
            state_dir,
            delta,
            concurrency,
            token_file=token_file,
            xds_ca=xds_ca,
            health_port=health_port,
            insecure=insecure,
            limit_store=limit_store,
            limit_store_password_file=limit_store_password_file,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
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
            await wait_either(stop, envoy.wait())
        finally:
            if registrar is not None:  # leave the catalogue before Envoy goes away
                await registrar.stop()
            await envoy.stop()

    run_until_signal(main)


def _check_metrics_address(value: str | None) -> str | None:
    """At parse time, so a bad address is a usage error before anything starts."""
    if value is not None:
        _metrics_address(value)
    return value


def _metrics_address(value: str) -> tuple[str, int]:
    """IP:PORT or [IPv6]:PORT. An IP, not a name: the metrics must listen on exactly the
    interface the operator chose, not on whatever a name resolves to."""
    import ipaddress

    from pydantic_core import PydanticCustomError

    from meshgate.policy import syntax

    try:
        host, port = syntax.parse_address(value)
        ipaddress.ip_address(host)
    except PydanticCustomError as exc:
        raise typer.BadParameter(f"{value!r}: {exc.message()}") from None
    except ValueError:
        raise typer.BadParameter(f"{value!r}: the host must be an IP address") from None
    return host, port


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
        raise fail(f"--register-consul {address!r}: {exc.message()}") from None
    try:
        host, port = syntax.parse_address(advertise)
        syntax.consul_name(service)
    except PydanticCustomError as exc:
        raise fail(f"--advertise {advertise!r} / --consul-service: {exc.message()}") from None
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise fail(f"--consul-token-file {token_file}: cannot read: {exc}") from None
    if ca_file is not None and not address.startswith("https://"):
        raise fail("--consul-ca-file needs an https:// --register-consul address")
    if health_port is None:
        raise fail("--register-consul needs --health-port (Consul's HTTP check)")
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


async def start_gateway(
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
    limit_store: str | None = None,
    limit_store_password_file: Path | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> Any:
    """The gateway Envoy, the shipper of its audit spool to the control plane, and the pacer
    its ratelimit and ext_proc filters call (started first, stopped last)."""
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
    paced = PacedGateway(
        gw,
        _pacer(gw, control_plane, limit_store, limit_store_password_file),
        metrics_port,
        metrics_host,
    )
    await paced.start()
    if wait_ready:
        try:
            await paced.wait_ready()
        except BaseException:  # the caller never gets it to stop: an Envoy left running
            await paced.stop()
            raise
    return paced


def _pacer(gw: Any, control_plane: str, limit_store: str | None, password_file: Path | None) -> Any:
    from meshgate.pacer.service import Pacer
    from meshgate.pacer.stores import store_factory
    from meshgate.sidecar.bootstrap import pacer_socket

    limit_store = limit_store or None
    if limit_store is not None and not limit_store.startswith(("redis://", "rediss://")):
        raise fail(f"--limit-store {limit_store!r}: expected redis://HOST:PORT/DB or rediss://...")
    factory = store_factory(
        limit_store,
        password_file=password_file,
        control_plane=control_plane,
        ca_file=gw.shipper.ca_file,
        metadata=gw.envoy.xds_metadata,
        refresh_metadata=gw.shipper.refresh_metadata,
    )
    return Pacer(pacer_socket(gw.admin.socket), factory)


class PacedGateway:
    """A gateway process (Envoy and audit shipper) with its pacer, on a thread of its own."""

    def __init__(
        self, gw: Any, pacer: Any, metrics_port: int | None, metrics_host: str = "127.0.0.1"
    ) -> None:
        self.gw = gw
        self.pacer = pacer
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host

    @property
    def admin(self) -> Any:
        return self.gw.admin

    async def start(self) -> None:
        await asyncio.to_thread(self.pacer.start)
        try:
            if self.metrics_port is not None:
                self.metrics_port = self.pacer.serve_metrics(self.metrics_port, self.metrics_host)
            await self.gw.start()
        except BaseException:
            await asyncio.to_thread(self.pacer.stop)
            raise

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Envoy ready, and its listener too: Envoy says ready even when it refused the
        listener it was sent (a port already taken), and agents would get connection refused."""
        await self.gw.wait_ready(timeout)
        refused = await asyncio.to_thread(rejected_listeners, self.gw.admin)
        if refused:
            from meshgate.errors import EnvoyError

            raise EnvoyError(
                f"the gateway's listener did not start: {'; '.join(refused)} (the Mesh's "
                "egressGateway.listenPort, demo's --gateway-port: is another gateway on it?)"
            )

    async def wait(self) -> int:
        return int(await self.gw.wait())

    async def stop(self) -> None:
        try:
            await self.gw.stop()
        finally:
            await asyncio.to_thread(self.pacer.stop)


def rejected_listeners(admin: Any) -> list[str]:
    """Why Envoy refused the listeners it was sent, from its config dump (names only)."""
    import httpx

    try:
        answer = admin.get("/config_dump?resource=dynamic_listeners&mask=name,error_state.details")
        configs = answer.json().get("configs", []) if answer.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):
        return []
    details = {str(c.get("error_state", {}).get("details") or "") for c in configs}
    return sorted(d for d in details if d)

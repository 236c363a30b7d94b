"""`meshgate inject`: Kubernetes sidecar injection, as a webhook or offline on a manifest."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from meshgate.cli.common import fail, run_until_signal, setup_logging
from meshgate.cli.options import PORT_RANGE, VerboseOpt
from meshgate.errors import MeshgateError

inject_app = typer.Typer(help="Kubernetes sidecar injection.", no_args_is_help=True)

DEFAULT_IMAGE = "ghcr.io/meshgate/meshgate:0.1.0"
DEFAULT_CONTROL_PLANE = "meshgate-control-plane.meshgate-system.svc:18000"
ImageOpt = Annotated[str, typer.Option(help="Image of the injected sidecar (has meshgate, envoy).")]
InjectCpOpt = Annotated[str, typer.Option(help="xDS address HOST:PORT the sidecars dial.")]
SidecarPortOpt = Annotated[
    int,
    typer.Option(
        help="Loopback proxy port of the injected sidecars (apps' HTTP_PROXY).", **PORT_RANGE
    ),
]
InjectHealthOpt = Annotated[
    int, typer.Option(help="Sidecar's loopback GET /healthz/ready port (its probes).", **PORT_RANGE)
]
InjectXdsCaOpt = Annotated[
    str,
    typer.Option(help="ConfigMap (key ca.crt) in the pod's namespace verifying the xDS port."),
]
InjectAgentTrustOpt = Annotated[
    str,
    typer.Option(
        help="ConfigMap (key ca.crt: the control plane's agent-trust CA) apps trust for "
        "https:// to intercepted destinations; '' for none.",
    ),
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
    agent_trust_configmap: str = "meshgate-agent-trust",
) -> Any:
    from meshgate.sidecar.injector import InjectSettings

    try:
        return InjectSettings(
            image,
            control_plane,
            sidecar_port,
            health_port,
            xds_ca_configmap=xds_ca_configmap if xds_tls else None,
            agent_trust_configmap=agent_trust_configmap or None,
        )
    except MeshgateError as exc:
        raise fail(str(exc)) from None


@inject_app.command("serve")
def inject_serve(
    cert: Annotated[Path, typer.Option(help="TLS certificate (PEM) the API server verifies.")],
    key: Annotated[Path, typer.Option(help="Its private key (PEM).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[
        int, typer.Option(help="HTTPS port (POST /mutate, GET /healthz).", **PORT_RANGE)
    ] = 8443,
    image: ImageOpt = DEFAULT_IMAGE,
    control_plane: InjectCpOpt = DEFAULT_CONTROL_PLANE,
    sidecar_port: SidecarPortOpt = 15080,
    health_port: InjectHealthOpt = 15021,
    xds_ca_configmap: InjectXdsCaOpt = "meshgate-xds-ca",
    xds_tls: InjectXdsTlsOpt = True,
    agent_trust_configmap: InjectAgentTrustOpt = "meshgate-agent-trust",
    verbose: VerboseOpt = False,
) -> None:
    """Run the mutating admission webhook that injects sidecars into labelled agent pods."""
    from meshgate.sidecar.webhook import serve_webhook

    settings = _inject_settings(
        image,
        control_plane,
        sidecar_port,
        health_port,
        xds_ca_configmap,
        xds_tls,
        agent_trust_configmap,
    )
    setup_logging(verbose)

    async def main(stop: asyncio.Event) -> None:
        await serve_webhook(settings, cert, key, host, port, stop)

    run_until_signal(main)


@inject_app.command("pod")
def inject_pod(
    file: Annotated[
        Path, typer.Argument(help="Manifest YAML, several documents allowed; - is stdin.")
    ],
    image: ImageOpt = DEFAULT_IMAGE,
    control_plane: InjectCpOpt = DEFAULT_CONTROL_PLANE,
    sidecar_port: SidecarPortOpt = 15080,
    health_port: InjectHealthOpt = 15021,
    xds_ca_configmap: InjectXdsCaOpt = "meshgate-xds-ca",
    xds_tls: InjectXdsTlsOpt = True,
    agent_trust_configmap: InjectAgentTrustOpt = "meshgate-agent-trust",
) -> None:
    """Print FILE with labelled Pods (and pod templates) injected as the webhook would."""
    from meshgate.sidecar.injector import inject_manifests

    settings = _inject_settings(
        image,
        control_plane,
        sidecar_port,
        health_port,
        xds_ca_configmap,
        xds_tls,
        agent_trust_configmap,
    )
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        print(inject_manifests(text, str(file), settings), end="")
    except MeshgateError as exc:
        raise fail(str(exc)) from None

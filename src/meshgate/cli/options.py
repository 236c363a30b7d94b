"""Option types more than one command takes, declared once so their names, defaults and help
cannot drift apart. Options only one command takes stay with it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from meshgate.cli.common import fail
from meshgate.cli.output import Format, format_option
from meshgate.pacing.open import LIMIT_STORE_ENV

DEFAULT_STATE = Path(".meshgate")
DEFAULT_ADMIN = "http://127.0.0.1:18001"
DEFAULT_XDS = "127.0.0.1:18000"

StateOpt = Annotated[Path, typer.Option(help="Directory for local state (CA, audit, bootstraps).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v")]

# --- talking to a running control plane's admin API (docs/admin-auth.md); the token itself
# never goes on a command line
AdminOpt = Annotated[str, typer.Option("--admin", help="Control plane admin URL.")]
AdminTokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="File holding the control plane's admin token (default: $MESHGATE_ADMIN_TOKEN, "
        "else STATE_DIR/admin/token)."
    ),
]
AuditControlPlaneOpt = Annotated[
    str | None,
    typer.Option(
        "--control-plane",
        help="Ask this control plane's admin API (e.g. http://127.0.0.1:18001) instead of "
        "opening the store.",
    ),
]
AuditAdminTokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--admin-token-file",
        help="With --control-plane: file holding its admin token (default: "
        "$MESHGATE_ADMIN_TOKEN, else <state-dir>/admin/token).",
    ),
]

# --- running the control plane (serve, up)
PoliciesOpt = Annotated[
    str, typer.Option("--policies", "-p", help="Policy directory, or git+URL@ref for a git repo.")
]
# a TCP port: out of range, the OS takes it modulo 65536 (--xds-port 70000 bound 4464)
PORT_RANGE = {"min": 0, "max": 65535}
XdsPortOpt = Annotated[int, typer.Option(help="Port for the xDS gRPC server.", **PORT_RANGE)]
AdminPortOpt = Annotated[int, typer.Option(help="Port for the admin HTTP server.", **PORT_RANGE)]
InsecureServeOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="LAB ONLY: plaintext xDS without join tokens and no sidecar -> gateway mTLS. "
        "Anyone who reaches the xDS port reads every credential.",
    ),
]
ServeAdminTokenOpt = Annotated[
    Path | None,
    typer.Option(
        help="Admin API token file to require (default: created as STATE_DIR/admin/token)."
    ),
]
AuditStoreOpt = Annotated[
    str | None,
    typer.Option(
        help="Audit store: a path, sqlite:///path or postgresql://... "
        "(default: $MESHGATE_AUDIT_STORE, else STATE_DIR/audit.db)."
    ),
]
LimitStoreOpt = Annotated[
    str | None,
    typer.Option(
        envvar=LIMIT_STORE_ENV,
        help="Where budgets and global limits are counted: redis://host:6379/0 (or rediss://), "
        f"shared by every control plane and gateway (default: ${LIMIT_STORE_ENV}; without "
        "it a control plane counts in its own process, a gateway in its control plane's, "
        "over the xDS port).",
    ),
]
LimitStorePasswordFileOpt = Annotated[
    Path | None,
    typer.Option(help="File whose first line is the Redis password (not on the command line)."),
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

# --- nodes (gateway, sidecar run) dialling the xDS port


def check_node_id(node_id: str, option: str, value: str, allowed: str) -> None:
    """Refuse a name the control plane would refuse as a node id: the node would start, be
    turned away on every connect, and never say why outside its Envoy log."""
    from meshgate.xds.nodes import parse_node_id

    try:
        parse_node_id(node_id)
    except ValueError:
        raise fail(f"{option} {value!r}: use {allowed}") from None


NAME_CHARS = "lower-case letters, digits and '-'"
ControlPlaneOpt = Annotated[str, typer.Option(help="xDS address HOST:PORT.")]
TokenFileOpt = Annotated[
    Path | None,
    typer.Option(help="Join token file (default: minted from --state-dir when readable)."),
]
XdsCaOpt = Annotated[
    Path | None,
    typer.Option(help="CA bundle that verifies a TLS xDS port (default: the local one, if any)."),
]
HealthPortOpt = Annotated[
    int | None,
    typer.Option(
        help="Envoy answers GET /healthz/ready on 127.0.0.1:PORT (for outside probes; nothing "
        "else). Envoy's admin is a unix socket in the state dir, never a port.",
        **PORT_RANGE,
    ),
]
InsecureNodeOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="LAB ONLY: talk plaintext, unauthenticated xDS to a `serve --insecure` plane.",
    ),
]

# --- the audit store
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Audit store: a path, sqlite:///path or postgresql://...[?schema=s] "
        "(default: $MESHGATE_AUDIT_STORE, else <state-dir>/audit.db).",
    ),
]
UntilOpt = Annotated[
    str | None, typer.Option(help="Before this time: a duration back (1h, 7d) or ISO 8601.")
]

# --- output formats: choices from output.Format, one line per bad value
TextOrJsonOpt = Annotated[Format, format_option(Format.TEXT, Format.JSON, help="text or json")]
TableOrJsonOpt = Annotated[Format, format_option(Format.TABLE, Format.JSON, help="table or json")]
RecordsFormatOpt = Annotated[
    Format,
    format_option(Format.TABLE, Format.JSON, Format.CSV, help="table, json (JSON lines) or csv"),
]
LinesFormatOpt = Annotated[
    Format, format_option(Format.TEXT, Format.JSON, help="text or json (JSON lines)")
]
WideOpt = Annotated[
    bool,
    typer.Option(
        "--wide",
        help="Every column of the table, unwrapped (lines may be longer than the terminal).",
    ),
]
TokenFormatOpt = Annotated[
    Format,
    format_option(
        Format.TOKEN, Format.K8S_SECRET, help="token, or k8s-secret (a Secret manifest)."
    ),
]

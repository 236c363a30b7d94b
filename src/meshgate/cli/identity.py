"""`meshgate identity`, `ca` and `token`: workload identities, the CA behind them, join tokens."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from meshgate.cli import admin
from meshgate.cli.common import fail
from meshgate.cli.options import (
    DEFAULT_ADMIN,
    DEFAULT_STATE,
    NAME_CHARS,
    AdminOpt,
    AdminTokenFileOpt,
    StateOpt,
    TextOrJsonOpt,
    TokenFormatOpt,
    check_node_id,
)
from meshgate.cli.output import Format, console, err_console, print_json
from meshgate.delegation.names import is_agent_name
from meshgate.durations import DurationError, parse_seconds
from meshgate.identity.agent_trust import ca_cert_path

# what `token create` prints as the token id (uuid4().hex), so a typo is not "revoked"
_TOKEN_ID = re.compile(r"[0-9a-f]{32}")


def _check_agent(agent: str) -> None:
    """A policy or sub-agent name: anything else names no agent (and, in a URL, another path)."""
    if not is_agent_name(agent):
        raise fail(f"--agent {agent!r}: use lower-case letters, digits and '-'")


identity_app = typer.Typer(help="Workload identities.", no_args_is_help=True)
ca_app = typer.Typer(
    help="The certificate authority (built-in, or Vault PKI as upstream).", no_args_is_help=True
)
token_app = typer.Typer(help="Join tokens for authenticated xDS.", no_args_is_help=True)


@identity_app.command("show")
def identity_show(
    agent: Annotated[str, typer.Option(help="Agent name.")],
    admin_url: AdminOpt = DEFAULT_ADMIN,
    format: TextOrJsonOpt = Format.TEXT,
    admin_token_file: AdminTokenFileOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """SPIFFE ID, current certificate (serial, expiry) and the rules that apply to AGENT."""
    _check_agent(agent)
    client = admin.connect(admin_url, admin_token_file, state_dir, timeout=5)
    path = f"/v1/identity/{agent}"
    keys = ("spiffe_id", "certificate", "mtls", "rules")
    data = admin.fields(admin.call(client, "GET", path), f"{admin_url.rstrip('/')}{path}", keys)
    if format is Format.JSON:
        print_json(data)
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


@ca_app.command("agent-trust")
def ca_agent_trust(state_dir: StateOpt = DEFAULT_STATE) -> None:
    """Print the agent-trust CA certificate (PEM): what agents trust for intercepted https://
    destinations (`sidecar run` adds it to theirs; publish it as the ConfigMap
    meshgate-agent-trust, key ca.crt, for injected pods). Public: never its key."""
    path = ca_cert_path(state_dir)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise fail(
            f"{path}: no agent-trust CA yet (the control plane creates it at start: run "
            "`meshgate up` or `serve` with this --state-dir)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"{path}: {exc}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise fail(f"{path}: not a PEM certificate")
    print(text, end="" if text.endswith("\n") else "\n")


@ca_app.command("rotate")
def ca_rotate(
    admin_url: AdminOpt = DEFAULT_ADMIN,
    admin_token_file: AdminTokenFileOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Roll the intermediate CA with overlap: old certificates stay valid until replaced.

    With --ca vault, Vault's PKI engine signs the new intermediate now."""
    client = admin.connect(admin_url, admin_token_file, state_dir, timeout=30)
    answer = admin.call(client, "POST", "/v1/ca/rotate", where=admin_url)
    data = admin.fields(answer, f"{admin_url.rstrip('/')}/v1/ca/rotate", ("intermediate_serial",))
    console.print(f"new intermediate {data['intermediate_serial']}; certificates roll over now")


@token_app.command("create")
def token_create(
    agent: Annotated[str | None, typer.Option(help="Token for agent/NAME (any instance).")] = None,
    gateway_name: Annotated[
        str | None, typer.Option("--gateway", help="Token for gateway/NAME.")
    ] = None,
    ttl: Annotated[str, typer.Option(help="Lifetime: 30s, 10m, 12h, 7d.")] = "1h",
    state_dir: StateOpt = DEFAULT_STATE,
    format: TokenFormatOpt = Format.TOKEN,
    namespace: Annotated[
        str | None, typer.Option(help="Namespace of the k8s-secret (the agent pods').")
    ] = None,
) -> None:
    """Print a signed join token (JWT) for one node; its id is on stderr for revocation."""
    from meshgate.identity.tokens import TokenAuthority, signing_key_path

    if (agent is None) == (gateway_name is None):
        raise fail("give exactly one of --agent NAME or --gateway NAME")
    if agent is not None:
        _check_agent(agent)
    else:
        check_node_id(f"gateway/{gateway_name}", "--gateway", str(gateway_name), NAME_CHARS)
    if namespace is not None and format is not Format.K8S_SECRET:
        raise fail("--namespace applies to --format k8s-secret only")
    try:
        seconds = parse_seconds(ttl, "--ttl", positive=True)
    except DurationError as exc:
        raise fail(str(exc)) from None
    subject = f"agent/{agent}" if agent else f"gateway/{gateway_name}"
    new_key = not signing_key_path(state_dir).exists()
    token, claims = TokenAuthority(state_dir).create(subject, seconds)
    if new_key:  # a mistyped --state-dir would otherwise give a token nothing accepts
        err_console.print(
            f"note: no signing key in {state_dir} yet: created {signing_key_path(state_dir)}; only "
            f"a control plane started with --state-dir {state_dir} accepts this token",
            highlight=False,
            markup=False,
        )
    if format is Format.K8S_SECRET:
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
    from meshgate.identity.tokens import TokenAuthority, signing_key_path

    if not _TOKEN_ID.fullmatch(token_id):
        raise fail(f"{token_id!r} is not a token id: give the 32 hex digits `token create` printed")
    if not signing_key_path(state_dir).exists():
        raise fail(
            f"{state_dir} issued no tokens (no {signing_key_path(state_dir)}): give --state-dir of "
            "the control plane that issued it"
        )
    TokenAuthority(state_dir).revoke(token_id)
    console.print(f"revoked {token_id}")

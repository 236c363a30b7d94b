"""`meshgate status`: what a running control plane serves, and to whom."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from meshgate.cli import admin
from meshgate.cli.options import (
    DEFAULT_ADMIN,
    DEFAULT_STATE,
    AdminOpt,
    AdminTokenFileOpt,
    StateOpt,
    TableOrJsonOpt,
)
from meshgate.cli.output import Format, console, print_json, print_table

XDS_TYPES = ("cds", "eds", "lds", "rds", "sds")


def status(
    admin_url: AdminOpt = DEFAULT_ADMIN,
    format: TableOrJsonOpt = Format.TABLE,
    admin_token_file: AdminTokenFileOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Connected nodes, their identity, ACKed version per type, last NACK; policy state."""
    client = admin.connect(admin_url, admin_token_file, state_dir, timeout=5)
    data = admin.call(client, "GET", "/status").body
    if format is Format.JSON:
        print_json(data)
        return
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
    nacks = [node["last_nack"] for node in data["nodes"] if node.get("last_nack")]
    print_table(
        ("node", "identity", "proto", *XDS_TYPES, "NACK"),
        (
            (
                node["node"],
                node["identity"],
                node["protocol"],
                *(_acked(node["types"].get(t)) for t in XDS_TYPES),
                "yes" if node.get("last_nack") else "",
            )
            for node in data["nodes"]
        ),
    )
    console.print(
        "columns per type: the policy version the node holds, else the content hash it ACKed "
        "('*' awaiting ACK of a newer one)"
    )
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
    rows = []
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
        rows.append([Text(c) for c in cells])  # plain text: a tag may contain "[...]"
        if s["last_error"]:
            errors.append(f"{s['service']}: {s['last_error']} ({s['last_error_at']})")
    print_table(
        ("consul service", "tag", "destinations", "instances", "index", "last success"), rows
    )
    for line in errors:
        console.print(Text.assemble(("consul error ", "red"), line), highlight=False)


def _acked(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    # the serving policy when the node holds its content; else the content hash it ACKed
    acked = str(entry.get("policy") or entry.get("acked") or "-")
    short = acked[:12]
    return f"{short}*" if entry.get("pending_ack") else short

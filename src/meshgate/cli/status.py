"""`meshgate status`: what a running control plane serves, and to whom."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.text import Text

from meshgate.cli import admin
from meshgate.cli.options import (
    DEFAULT_ADMIN,
    DEFAULT_STATE,
    AdminOpt,
    AdminTokenFileOpt,
    StateOpt,
    TableOrJsonOpt,
    WideOpt,
)
from meshgate.cli.output import Column, Format, Show, fitted_console, print_json, print_table

XDS_TYPES = ("cds", "eds", "lds", "rds", "sds")
STATUS_KEYS = ("policy", "nodes")  # what a meshgate control plane's /status always holds

# by default the versions in one column grouped by value; --wide: one column per type
NODE_COLUMNS = (
    Column("node"),
    Column("identity", Show.FIT),
    Column("proto", Show.WIDE),
    Column("envoy", Show.WIDE),
    Column("ACKed", Show.NARROW),
    *(Column(t, Show.WIDE) for t in XDS_TYPES),
    Column("NACK"),
)
CONSUL_COLUMNS = (
    Column("consul service"),
    Column("tag", Show.FIT),
    Column("destinations"),
    Column("instances", justify="right"),
    Column("index", Show.WIDE),
    Column("last success"),
)


def status(
    admin_url: AdminOpt = DEFAULT_ADMIN,
    format: TableOrJsonOpt = Format.TABLE,
    wide: WideOpt = False,
    admin_token_file: AdminTokenFileOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Connected nodes, their identity, ACKed version per type, last NACK; policy state."""
    client = admin.connect(admin_url, admin_token_file, state_dir, timeout=5)
    data = admin.fields(
        admin.call(client, "GET", "/status"), f"{admin_url.rstrip('/')}/status", STATUS_KEYS
    )
    if format is Format.JSON:
        print_json(data)
        return
    out = fitted_console()
    pol = data["policy"]
    out.print(
        f"[bold]policy[/bold] {escape(str(pol['version'] or '-'))} from "
        f"{escape(str(pol['source']))} ({pol['agents']} agents, "
        f"{pol['destinations']} destinations)"
    )
    if pol.get("missing_secrets"):
        names = escape(", ".join(pol["missing_secrets"]))
        out.print(f"[yellow]missing secrets[/yellow] (their destinations answer 503): {names}")
    if data.get("ca"):
        ca = data["ca"]
        out.print(
            f"[bold]ca[/bold] {escape(str(ca['source']))}, intermediate "
            f"{ca['intermediate_serial']} valid until {ca['intermediate_not_after']}"
        )
    if pol.get("last_rejection"):
        rej = pol["last_rejection"]
        out.print(f"[red]last change refused[/red] ({escape(rej['origin'])}, {rej['at']}):")
        for problem in rej["problems"]:
            out.print(Text(f"  {problem}"))
    _print_consul(data.get("consul") or [], wide)
    for sub in data.get("sub_agents") or []:  # delegation: who runs with whose rights
        rules = ", ".join(str(r["rule"]) for r in sub["rules"])
        out.print(
            Text(
                f"sub-agent {sub['agent']} (chain {sub['chain']}) keeps rules {rules} of "
                f"{sub['parent']}, until {sub['expires_at']}"
            )
        )
    nodes = data["nodes"]
    print_table(
        NODE_COLUMNS,
        (
            (
                node["node"],
                node["identity"],
                node["protocol"],
                str(node.get("envoy") or "-"),
                _acked_by_version(node["types"]),
                *(_acked(node["types"].get(t)) for t in XDS_TYPES),
                node["last_nack"]["type"] if node.get("last_nack") else "",
            )
            for node in nodes
        ),
        wide=wide,
    )
    out.print(
        "ACKed: the policy version a node holds per type, else the content hash it ACKed "
        "('*' awaiting ACK of a newer one)"
    )
    for nack in (node["last_nack"] for node in nodes if node.get("last_nack")):
        out.print(
            Text.assemble(
                ("NACK", "red"),
                f" {nack['node']} {nack['type']} {nack['version']} at {nack['at']}: "
                f"{nack['message']}",
            )
        )


def _print_consul(services: list[dict[str, Any]], wide: bool) -> None:
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
        rows.append(cells)
        if s["last_error"]:
            errors.append(f"{s['service']}: {s['last_error']} ({s['last_error_at']})")
    print_table(CONSUL_COLUMNS, rows, wide=wide)
    out = fitted_console()
    for line in errors:
        out.print(Text.assemble(("consul error ", "red"), line))


def _acked_by_version(types: dict[str, dict[str, Any]]) -> str:
    """One line per version held, naming its types: `cds,eds,lds,rds,sds: 3f2a9c1b7d4e` when
    a node is in step, which fits where five version columns cannot."""
    by_version: dict[str, list[str]] = {}
    for t in (*XDS_TYPES, *sorted(set(types) - set(XDS_TYPES))):
        if t in types:
            by_version.setdefault(_acked(types[t]), []).append(t)
    return "\n".join(f"{','.join(ts)}: {version}" for version, ts in by_version.items()) or "-"


def _acked(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    # the serving policy when the node holds its content; else the content hash it ACKed
    acked = str(entry.get("policy") or entry.get("acked") or "-")
    short = acked[:12]
    return f"{short}*" if entry.get("pending_ack") else short

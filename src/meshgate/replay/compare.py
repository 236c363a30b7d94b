"""What a candidate policy would change on recorded traffic: classification and the report. Pure.

Records come in already grouped (`RecordGroup`: identical request fields and recorded outcome,
with a count and one example); each group is evaluated once against the candidate's route
table (`routes.PolicyRoutes`) and compared with what the gateway recorded, at the level routes
decide: allowed (by an allow route, whatever the upstream then answered) or refused, and why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from meshgate.delegation.names import parent_of
from meshgate.replay.routes import PolicyRoutes, Request, Verdict

# What the gateway does outside its route table; the replay says it does not predict these.
NOT_REPLAYED = (
    "path guard (length, canonical form)",
    "MCP body limits and parse failures",
    "rate limits",
    "concurrency limits",
    "budgets",
    "LLM model and token limits",
    "tool argument rules",
    "credential availability (every secret assumed present)",
    "upstream failures",
)

# Refusals that are a route's answer (xds.access_log route names), by audit reason.
ROUTE_REFUSALS = frozenset({"egress_denied", "tool_denied", "mcp_unparsed", "unknown_destination"})
MAX_EXAMPLES = 3

Change = Literal["newly_refused", "newly_allowed", "undecided"]


@dataclass(frozen=True)
class RecordGroup:
    """Records with the same request fields and recorded outcome (see `records.GROUP_COLUMNS`)."""

    agent: str  # the agent's name as recorded
    spiffe_id: str
    host: str
    method: str
    path: str
    mcp_method: str
    mcp_tool: str
    has_body: bool
    by_gateway: bool  # logged by a gateway (not a sidecar that could not reach one)
    decision: str
    reason: str
    destination: str
    count: int
    example_id: str = ""
    example_time: str = ""  # ISO 8601 UTC
    policy_version: str = ""  # the policy that decided what was recorded

    def request(self) -> Request:
        return Request(
            self.spiffe_id or self.agent,
            self.host,
            self.method,
            self.path,
            self.mcp_method,
            self.mcp_tool,
            self.has_body,
        )


def recorded_outcome(decision: str, reason: str) -> str | None:
    """ "allowed" or "refused: <reason>" as the route decided; None if the route's answer is not
    what the record tells (a filter refused first, or Envoy found no route)."""
    # limiters and the pacer run on an allow route: the route allowed these
    if decision in ("allowed", "rate_limited", "over_budget", "queue_timeout"):
        return "allowed"
    if decision == "upstream_error":
        if reason == "credential_unavailable":  # the no-credential route
            return None
        return "allowed"
    if decision == "denied" and reason in ROUTE_REFUSALS:
        return f"refused: {reason}"
    return None


def _not_replayed_reason(group: RecordGroup) -> str:
    if parent_of(group.agent) is not None:
        return "a sub-agent's (its rights are its parent's, narrowed at run time)"
    if not group.by_gateway:
        return "logged by a sidecar (never reached a gateway)"
    if group.decision == "upstream_error":
        return "credential_unavailable"
    return f"{group.decision}: {group.reason or 'no reason'}"


def candidate_outcome(verdict: Verdict) -> str:
    d = verdict.decision
    return "allowed" if d.decision == "allowed" else f"refused: {d.reason}"


@dataclass(frozen=True)
class Example:
    method: str
    host: str
    path: str
    mcp_method: str
    mcp_tool: str
    requests: int
    request_id: str
    time: str
    policy_version: str


@dataclass
class ChangeRow:
    """One line of the report: a change for one agent, destination and tool."""

    change: Change
    agent: str
    destination: str
    tool: str
    was: str
    now: str
    requests: int = 0
    examples: list[Example] = field(default_factory=list)


@dataclass
class ReplayReport:
    policy_version: str
    since: str | None
    records: int = 0
    distinct: int = 0
    replayed: int = 0
    unchanged: int = 0
    newly_refused: int = 0
    newly_allowed: int = 0
    undecided: int = 0
    not_replayed: dict[str, int] = field(default_factory=dict)
    rows: dict[tuple[str, str, str, str, str, str], ChangeRow] = field(default_factory=dict)

    strict: bool = False  # undecided requests fail the check too

    @property
    def exit_code(self) -> int:
        """0: no recorded request would be newly refused; 2: some would (with `strict`: or
        might, their answer depending on a header the records do not hold)."""
        return 2 if self.newly_refused or (self.strict and self.undecided) else 0

    def add(self, group: RecordGroup, verdict: Verdict | None) -> None:
        self.records += group.count
        self.distinct += 1
        was = recorded_outcome(group.decision, group.reason) if group.by_gateway else None
        if parent_of(group.agent) is not None:  # rights granted at run time, not in any policy file
            was = None
        if was is None or verdict is None:
            why = _not_replayed_reason(group)
            self.not_replayed[why] = self.not_replayed.get(why, 0) + group.count
            return
        self.replayed += group.count
        change: Change
        if verdict.undecided:
            change = "undecided"
            self.undecided += group.count
            now = " or ".join(
                dict.fromkeys(
                    "allowed" if d.decision == "allowed" else f"refused: {d.reason}"
                    for d in verdict.decisions
                )
            )
            now += f" (depends on header {', '.join(verdict.unknown_headers)}: not recorded)"
        else:
            now = candidate_outcome(verdict)
            allowed_then, allowed_now = was == "allowed", now == "allowed"
            if allowed_then == allowed_now:
                self.unchanged += group.count
                return
            change = "newly_allowed" if allowed_now else "newly_refused"
            if allowed_now:
                self.newly_allowed += group.count
            else:
                self.newly_refused += group.count
        destination = group.destination or verdict.decision.destination or group.host
        key = (change, group.agent, destination, group.mcp_tool, was, now)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = ChangeRow(
                change, group.agent, destination, group.mcp_tool, was, now
            )
        row.requests += group.count
        example = Example(
            group.method,
            group.host,
            group.path,
            group.mcp_method,
            group.mcp_tool,
            group.count,
            group.example_id,
            group.example_time,
            group.policy_version,
        )
        row.examples.append(example)
        row.examples.sort(key=lambda e: -e.requests)
        del row.examples[MAX_EXAMPLES:]

    def sorted_rows(self) -> list[ChangeRow]:
        order = {"newly_refused": 0, "undecided": 1, "newly_allowed": 2}
        return sorted(
            self.rows.values(),
            key=lambda r: (order[r.change], -r.requests, r.agent, r.destination, r.tool),
        )


def replay(
    groups: Iterable[RecordGroup],
    candidate: PolicyRoutes,
    since: str | None = None,
    strict: bool = False,
) -> ReplayReport:
    """Each group evaluated once: the cost is per distinct request, not per record."""
    report = ReplayReport(candidate.model.version, since, strict=strict)
    for group in groups:
        verdict = candidate.evaluate(group.request()) if group.by_gateway else None
        report.add(group, verdict)
    return report


def report_json(report: ReplayReport) -> dict[str, Any]:
    return {
        "policy_version": report.policy_version,
        "since": report.since,
        "records": report.records,
        "distinct_requests": report.distinct,
        "replayed": report.replayed,
        "unchanged": report.unchanged,
        "newly_refused": report.newly_refused,
        "newly_allowed": report.newly_allowed,
        "undecided": report.undecided,
        "not_replayed_records": dict(sorted(report.not_replayed.items())),
        "not_replayed": list(NOT_REPLAYED),
        "changes": [
            {
                "change": r.change,
                "agent": r.agent,
                "destination": r.destination,
                "tool": r.tool,
                "was": r.was,
                "now": r.now,
                "requests": r.requests,
                "examples": [e.__dict__ for e in r.examples],
            }
            for r in report.sorted_rows()
        ],
        "exit_code": report.exit_code,
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def report_text(report: ReplayReport) -> str:
    since = f" since {report.since}" if report.since else ""
    out = [
        f"Replay of policy {report.policy_version} on {report.records} recorded requests{since} "
        f"({report.distinct} distinct, {report.replayed} replayed)",
        f"  newly refused: {report.newly_refused}   newly allowed: {report.newly_allowed}   "
        f"undecided: {report.undecided}   unchanged: {report.unchanged}",
    ]
    rows = report.sorted_rows()
    if rows:
        out.append("")
        table: list[list[str]] = []
        for r in rows:
            ex = r.examples[0] if r.examples else None
            shown = (
                f"{ex.method} {ex.host}{ex.path}" + (f" [{ex.mcp_tool}]" if ex.mcp_tool else "")
                if ex
                else ""
            )
            table.append(
                [
                    r.change,
                    r.agent or "-",
                    r.destination,
                    r.tool or "-",
                    str(r.requests),
                    r.now,
                    shown,
                ]
            )
        out += _table(
            ["CHANGE", "AGENT", "DESTINATION", "TOOL", "REQUESTS", "NOW", "EXAMPLE"], table
        )
        out.append("")
        out.append("Examples:")
        for r in rows:
            who = r.agent or "(no agent header)"
            out.append(f"  {r.change} {who} -> {r.destination} ({r.was} -> {r.now}):")
            for e in r.examples:
                tool = f" {e.mcp_method} {e.mcp_tool}".rstrip() if e.mcp_method else ""
                out.append(
                    f"    {e.requests} x {e.method} {e.host}{e.path}{tool}"
                    f"  (e.g. {e.request_id} at {e.time}, policy {e.policy_version or '?'})"
                )
    else:
        out.append("No recorded request changes its decision.")
    if report.not_replayed:
        out.append("")
        out.append("Records not replayed (decided outside the route table):")
        for reason, n in sorted(report.not_replayed.items(), key=lambda kv: -kv[1]):
            out.append(f"  {n:>10}  {reason}")
    out.append("")
    out.append("not replayed: " + ", ".join(NOT_REPLAYED))
    return "\n".join(out)

"""Which snapshot a node gets: node ids name their role, and roles map to node groups.

`gateway/<name>`: an egress gateway; every gateway shares the group `gateway`.
`agent/<agent>[/<instance>]`: a sidecar; every sidecar of one agent shares `agent/<agent>`
(`<agent>` may be a sub-agent, `parent.child`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_GATEWAY = re.compile(rf"^gateway/(?P<name>{_NAME})$")
# a sub-agent's name is its parents' and its own joined by dots (delegation/names.py)
_AGENT = re.compile(
    rf"^agent/(?P<name>{_NAME}(\.{_NAME}){{0,3}})(/(?P<instance>[A-Za-z0-9._-]{{1,128}}))?$"
)

GATEWAY_GROUP = "gateway"


@dataclass(frozen=True)
class NodeRole:
    kind: str  # "gateway" | "agent"
    name: str
    group: str


def parse_node_id(node_id: str) -> NodeRole:
    """Map a node id to its role; ValueError with a readable message for anything else."""
    if m := _GATEWAY.match(node_id):
        return NodeRole("gateway", m["name"], GATEWAY_GROUP)
    if m := _AGENT.match(node_id):
        return NodeRole("agent", m["name"], f"agent/{m['name']}")
    raise ValueError(
        f"node.id {node_id!r} must be 'gateway/<name>' or 'agent/<name>[/<instance>]'"
        " (names: lower-case letters, digits and '-')"
    )

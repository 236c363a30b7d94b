"""Who is connected, what each node has been sent and has ACKed, and every recent NACK."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshgate.xds import types
from meshgate.xds.nodes import NodeRole
from meshgate.xds.protocol import TypeState
from meshgate.xds.snapshot import Snapshot


@dataclass(frozen=True)
class Nack:
    node_id: str
    type_url: str
    version: str
    message: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "type": types.SHORT_NAMES.get(self.type_url, self.type_url),
            "version": self.version,
            "message": self.message,
            "at": _iso(self.at),
        }


@dataclass
class NodeConnection:
    stream_id: int
    node_id: str
    role: NodeRole
    protocol: str  # "sotw" | "delta"
    peer: str
    identity: str
    envoy_version: str
    connected_at: float = field(default_factory=time.time)
    types: dict[str, TypeState] = field(default_factory=dict)
    last_nack: Nack | None = None
    # the group's snapshot and the serving policy, so status can say which policy a node's
    # ACKed content belongs to
    current: Callable[[], tuple[Snapshot | None, str | None]] = field(
        default=lambda: (None, None), repr=False
    )

    def policy_acked(self, type_url: str) -> str | None:
        """The serving policy's version if this node ACKed that policy's content for the type.

        Versions are content hashes, so a node whose content a policy change left alone was
        sent nothing and is on the new policy all the same."""
        st = self.types.get(type_url)
        snap, policy = self.current()
        if st is None or snap is None or st.version_acked != snap.version(type_url):
            return None
        return policy

    def to_json(self) -> dict[str, Any]:
        per_type = {}
        for type_url in sorted(self.types, key=types.order_key):
            st = self.types[type_url]
            per_type[types.SHORT_NAMES.get(type_url, type_url)] = {
                "sent": st.version_sent,
                "acked": st.version_acked,
                "policy": self.policy_acked(type_url),
                "pending_ack": st.in_flight,
                "rejected": st.rejected_version,
                "subscribed": "*" if st.names is None or st.wildcard else sorted(st.names),
            }
        return {
            "node": self.node_id,
            "kind": self.role.kind,
            "group": self.role.group,
            "identity": self.identity,
            "protocol": self.protocol,
            "peer": self.peer,
            "envoy": self.envoy_version,
            "connected_at": _iso(self.connected_at),
            "types": per_type,
            "last_nack": self.last_nack.to_json() if self.last_nack else None,
        }


class NodeRegistry:
    """Live connections plus a bounded history of NACKs (kept after a node disconnects)."""

    def __init__(self, nack_history: int = 100) -> None:
        self._connections: dict[int, NodeConnection] = {}
        self._nacks: collections.deque[Nack] = collections.deque(maxlen=nack_history)
        self._last_nack_by_node: dict[str, Nack] = {}

    def add(self, conn: NodeConnection) -> None:
        conn.last_nack = self._last_nack_by_node.get(conn.node_id)
        self._connections[conn.stream_id] = conn

    def remove(self, stream_id: int) -> None:
        self._connections.pop(stream_id, None)

    def record_nack(self, conn: NodeConnection, type_url: str, version: str, message: str) -> Nack:
        nack = Nack(conn.node_id, type_url, version, message, time.time())
        conn.last_nack = nack
        self._last_nack_by_node[conn.node_id] = nack
        self._nacks.append(nack)
        return nack

    def connections(self) -> list[NodeConnection]:
        return sorted(self._connections.values(), key=lambda c: (c.node_id, c.stream_id))

    def nacks(self) -> list[Nack]:
        return list(self._nacks)

    def __len__(self) -> int:
        return len(self._connections)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

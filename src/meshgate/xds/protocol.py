"""The xDS request rules as pure functions over per-stream, per-type state.

Both servers (state of the world and delta) call these; neither decides ACK/NACK/stale itself.
No gRPC here, so every rule is unit-tested directly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from meshgate.xds import types


class Kind(enum.Enum):
    NEW = "new"  # first request for the type on this stream (or a reconnect)
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"  # answers a response that has been superseded: ignored


@dataclass
class TypeState:
    """What one stream has been sent and has acknowledged for one type."""

    type_url: str
    names: frozenset[str] | None = None  # None: wildcard
    nonce_sent: str | None = None
    version_sent: str | None = None
    version_acked: str | None = None
    in_flight: bool = False  # a response is awaiting ACK/NACK: hold further pushes
    rejected_version: str | None = None
    last_error: str | None = None
    # delta only: the version of each resource the client holds, as far as we know
    client_versions: dict[str, str] = field(default_factory=dict)
    wildcard: bool = False  # delta only


def classify(state: TypeState, response_nonce: str, has_error: bool) -> Kind:
    """Classify a request against what was last sent on this stream for its type."""
    if state.nonce_sent is None or not response_nonce:
        return Kind.NEW
    if response_nonce != state.nonce_sent:
        return Kind.STALE
    return Kind.NACK if has_error else Kind.ACK


def acknowledge(state: TypeState, version: str | None) -> None:
    """Record an ACK. Accepting a version ends any earlier rejection: versions are content
    hashes, so if the rejected content comes back later it is a new change and is sent."""
    state.version_acked = version
    state.rejected_version = None


def sotw_names(type_url: str, requested: list[str]) -> frozenset[str] | None:
    """A SotW subscription: None (wildcard) for CDS/LDS with no names or '*'."""
    if type_url in types.WILDCARD_TYPES and (not requested or "*" in requested):
        return None
    return frozenset(n for n in requested if n != "*")


def should_push(state: TypeState, current_version: str) -> bool:
    """After a snapshot change (or an ACK/NACK) on SotW: push only a new, not-rejected version."""
    if state.in_flight or state.nonce_sent is None:
        return False
    if current_version == state.version_sent:
        return False
    return current_version != state.rejected_version


@dataclass(frozen=True)
class DeltaPlan:
    """What a delta response must carry: changed resource names, and names to remove."""

    updated: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.updated and not self.removed


def apply_delta_subscription(
    state: TypeState, subscribe: list[str], unsubscribe: list[str], first: bool
) -> None:
    """Fold a delta request's subscription changes into the stream state."""
    names = set(state.names or ())
    if first and not subscribe and state.type_url in types.WILDCARD_TYPES:
        state.wildcard = True
    for name in subscribe:
        if name == "*":
            state.wildcard = True
        else:
            names.add(name)
    for name in unsubscribe:
        if name == "*":
            state.wildcard = False
        else:
            names.discard(name)
            state.client_versions.pop(name, None)
    state.names = frozenset(names)


def plan_delta(state: TypeState, available: dict[str, str]) -> DeltaPlan:
    """Diff the snapshot (name -> version) against what the client holds.

    A resource the client NACKed keeps its rejected version in `client_versions`, so the same
    bad version is never re-sent; a new version of it is.
    """
    wanted = set(available) if state.wildcard else (state.names or frozenset()) & available.keys()
    updated = tuple(sorted(n for n in wanted if state.client_versions.get(n) != available[n]))
    removed = tuple(sorted(n for n in state.client_versions if n not in available))
    return DeltaPlan(updated, removed)

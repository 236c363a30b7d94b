"""Immutable, checked snapshots: every resource a node group should have, serialised once.

Versions come from content only: a resource's is the sha256 of its deterministic encoding, a
type's the hash of its resources' names and versions. So replicas agree, and a policy change
that leaves a node group's content of a type alone leaves that type's version alone: nothing is
pushed for it. The policy version is kept beside the content, for status, never inside a version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from meshgate.errors import ConsistencyError
from meshgate.xds import types
from meshgate.xds.wire import length_delimited, string_field

_HCM_TYPE = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


@dataclass(frozen=True)
class Encoded:
    """A resource already serialised, assembled from cached parts (see xds/gateway.py)."""

    name: str
    type_url: str
    payload: bytes


@dataclass(frozen=True, eq=False)  # identity: memoised builders hand out the same objects
class Resource:
    """One named resource with its packed bytes and content version."""

    name: str
    type_url: str
    any_bytes: bytes  # serialised google.protobuf.Any
    version: str
    delta_bytes: bytes  # serialised envoy.service.discovery.v3.Resource
    # names of the EDS (for clusters) or RDS (for listeners) resources this one needs,
    # found once here so checking a snapshot never unpacks messages again
    needs: tuple[str, ...] = ()

    @classmethod
    def build(cls, name: str, message: Message | Encoded) -> Resource:
        if isinstance(message, Encoded):
            return cls.from_payload(name, message.type_url, message.payload, ())
        type_url = "type.googleapis.com/" + message.DESCRIPTOR.full_name
        payload = message.SerializeToString(deterministic=True)
        return cls.from_payload(name, type_url, payload, _needs(message))

    @classmethod
    def from_payload(
        cls, name: str, type_url: str, payload: bytes, needs: tuple[str, ...]
    ) -> Resource:
        version = hashlib.sha256(payload).hexdigest()[:16]
        packed = any_pb2.Any(type_url=type_url, value=payload)
        any_bytes = packed.SerializeToString(deterministic=True)
        delta = discovery_pb2.Resource(name=name, version=version)
        delta_bytes = delta.SerializeToString(deterministic=True) + length_delimited(2, any_bytes)
        return cls(name, type_url, any_bytes, version, delta_bytes, needs)


@dataclass(frozen=True)
class Snapshot:
    """Everything one node group is served. Built whole, checked, never mutated."""

    policy_version: str  # what it was built from; informational, never part of a version
    resources: Mapping[str, Mapping[str, Resource]]
    type_versions: Mapping[str, str]  # content digest per type (every type in TYPE_ORDER)
    _sotw_cache: dict[tuple[str, frozenset[str] | None], bytes] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def build(
        cls, policy_version: str, resources: Iterable[Resource], recurring: bool = False
    ) -> Snapshot:
        """`recurring`: the same resource objects will come again (per-agent sidecars), so the
        snapshot itself is memoised on them: an unchanged agent's snapshot is the same object
        under every policy version (its `policy_version` is the one it was first built for),
        and rebuilding 10,000 agents allocates nothing that outlives the build.
        One-off sets (the gateway) are not kept."""
        if recurring:
            return _recurring(tuple(resources), policy_version)
        frozen, versions = _index(tuple(resources))
        return cls(policy_version, frozen, versions)

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, MappingProxyType({}))

    def version(self, type_url: str) -> str:
        return self.type_versions.get(type_url, _EMPTY_DIGEST)

    def changed_types(self, previous: Snapshot | None) -> list[str]:
        """Types (in push order) whose content differs from `previous`'s."""
        return [
            t
            for t in types.TYPE_ORDER
            if previous is None or previous.version(t) != self.version(t)
        ]

    def keep_bodies(self, previous: Snapshot) -> None:
        """Adopt `previous`'s cached SotW bodies for the types whose content is unchanged, so
        a change to one type (the gateway's routes) does not re-serialise the others."""
        for key, body in previous._sotw_cache.items():
            if previous.version(key[0]) == self.version(key[0]):
                self._sotw_cache.setdefault(key, body)

    def sotw_body(self, type_url: str, names: frozenset[str] | None) -> bytes:
        """DiscoveryResponse bytes without a nonce, cached per (type, subscription)."""
        key = (type_url, names)
        body = self._sotw_cache.get(key)
        if body is None:
            selected = self.of_type(type_url)
            parts = [string_field(1, self.version(type_url))]
            for name, res in selected.items():
                if names is None or name in names:
                    parts.append(length_delimited(2, res.any_bytes))
            parts.append(string_field(4, type_url))
            body = b"".join(parts)
            self._sotw_cache[key] = body
        return body


_RECURRING: dict[tuple[Resource, ...], Snapshot] = {}
_MAX_RECURRING = 100_000


def _recurring(resources: tuple[Resource, ...], policy_version: str) -> Snapshot:
    snap = _RECURRING.get(resources)
    if snap is None:
        frozen, versions = _index(resources)
        snap = _RECURRING[resources] = Snapshot(policy_version, frozen, versions)
        if len(_RECURRING) > _MAX_RECURRING:
            del _RECURRING[next(iter(_RECURRING))]  # the oldest: a bound on memory
    return snap


def clear_cache() -> None:
    """Forget memoised sidecar snapshots (cold-start measurements and tests)."""
    _RECURRING.clear()


def _index(
    resources: tuple[Resource, ...],
) -> tuple[Mapping[str, Mapping[str, Resource]], Mapping[str, str]]:
    """Group, order, hash and check a resource set."""
    by_type: dict[str, dict[str, Resource]] = {t: {} for t in types.TYPE_ORDER}
    for res in resources:
        bucket = by_type.setdefault(res.type_url, {})
        if res.name in bucket:
            raise ConsistencyError(f"duplicate {types.SHORT_NAMES.get(res.type_url)} {res.name!r}")
        bucket[res.name] = res
    frozen = MappingProxyType(
        {t: MappingProxyType(dict(sorted(bucket.items()))) for t, bucket in by_type.items()}
    )
    digests = MappingProxyType({t: _content_digest(bucket) for t, bucket in frozen.items()})
    _check_consistent(frozen)
    return frozen, digests


def _check_consistent(resources: Mapping[str, Mapping[str, Resource]]) -> None:
    """Every EDS name a cluster needs and every route a listener names must be present."""
    missing: list[str] = []
    for kind, what, needed_type, needed in (
        (types.CLUSTER, "cluster", types.ENDPOINT, "endpoints"),
        (types.LISTENER, "listener", types.ROUTE, "route"),
    ):
        available = resources.get(needed_type, {})
        for res in resources.get(kind, {}).values():
            missing.extend(
                f"{what} {res.name!r} needs {needed} {name!r}"
                for name in res.needs
                if name not in available
            )
    if missing:
        raise ConsistencyError("inconsistent snapshot: " + "; ".join(missing))


def _content_digest(bucket: Mapping[str, Resource]) -> str:
    """A type's version: its resources' names and content versions, in name order."""
    digest = hashlib.sha256()
    for name, res in bucket.items():
        digest.update(name.encode() + b"\0" + res.version.encode() + b"\n")
    return digest.hexdigest()[:16]


_EMPTY_DIGEST = _content_digest({})


def _needs(message: Message) -> tuple[str, ...]:
    if isinstance(message, cluster_pb2.Cluster) and message.type == cluster_pb2.Cluster.EDS:
        return (message.eds_cluster_config.service_name or message.name,)
    if isinstance(message, listener_pb2.Listener):
        return tuple(_route_names(message))
    return ()


def _route_names(listener: listener_pb2.Listener) -> list[str]:
    names: list[str] = []
    chains = [*listener.filter_chains]
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for flt in chain.filters:
            if flt.typed_config.type_url == _HCM_TYPE:
                hcm = hcm_pb2.HttpConnectionManager()
                flt.typed_config.Unpack(hcm)
                if hcm.HasField("rds"):
                    names.append(hcm.rds.route_config_name)
    return names

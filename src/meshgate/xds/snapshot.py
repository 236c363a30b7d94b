"""Immutable, checked snapshots: every resource a node group should have, serialised once.

Versions come from content only: a resource's is the sha256 of its deterministic encoding, a
type's the hash of its resources' names and versions. So replicas agree, and a policy change
that leaves a node group's content of a type alone leaves that type's version alone: nothing is
pushed for it. The policy version is kept beside the content, for status, never inside a version.
"""

from __future__ import annotations

import hashlib
import weakref
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


@dataclass(frozen=True, eq=False)
class TypeContent:
    """One type's resources for a node group, its version, and its SotW bodies.

    Shared by every snapshot with the same content of that type (interned in `_CONTENTS` by
    version), so a body is serialised once however many groups are served it: after a change
    to the gateway's port, all 10,000 sidecars' CDS is one body."""

    type_url: str
    resources: Mapping[str, Resource]  # in name order
    version: str
    _bodies: dict[frozenset[str] | None, bytes] = field(default_factory=dict, repr=False)

    def sotw_body(self, names: frozenset[str] | None) -> bytes:
        """DiscoveryResponse bytes without a nonce, cached per subscription."""
        body = self._bodies.get(names)
        if body is None:
            parts = [string_field(1, self.version)]
            for name, res in self.resources.items():
                if names is None or name in names:
                    parts.append(length_delimited(2, res.any_bytes))
            parts.append(string_field(4, self.type_url))
            body = self._bodies.setdefault(names, b"".join(parts))
        return body


@dataclass(frozen=True)
class Snapshot:
    """Everything one node group is served. Built whole, checked, never mutated."""

    policy_version: str  # what it was built from; informational, never part of a version
    resources: Mapping[str, Mapping[str, Resource]]
    type_versions: Mapping[str, str]  # content digest per type (every type in TYPE_ORDER)
    contents: Mapping[str, TypeContent] = field(compare=False, repr=False)

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
        return _index(policy_version, tuple(resources))

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

    def sotw_body(self, type_url: str, names: frozenset[str] | None) -> bytes:
        """DiscoveryResponse bytes without a nonce, cached per (type content, subscription)."""
        content = self.contents.get(type_url)
        if content is None:  # a type this group has nothing of
            content = _content(type_url, ())
        return content.sotw_body(names)


# Both memos hold their values weakly: an entry lives as long as some served snapshot uses it,
# so superseded snapshots (and their bodies) are freed instead of piling up for the collector.
_RECURRING: weakref.WeakValueDictionary[tuple[Resource, ...], Snapshot] = (
    weakref.WeakValueDictionary()
)
_CONTENTS: weakref.WeakValueDictionary[tuple[str, str], TypeContent] = weakref.WeakValueDictionary()


def _recurring(resources: tuple[Resource, ...], policy_version: str) -> Snapshot:
    snap = _RECURRING.get(resources)
    if snap is None:
        snap = _RECURRING[resources] = _index(policy_version, resources)
    return snap


def clear_cache() -> None:
    """Forget memoised sidecar snapshots (cold-start measurements and tests)."""
    _RECURRING.clear()
    _CONTENTS.clear()


def _index(policy_version: str, resources: tuple[Resource, ...]) -> Snapshot:
    """Group, order, hash and check a resource set."""
    by_type: dict[str, dict[str, Resource]] = {t: {} for t in types.TYPE_ORDER}
    for res in resources:
        bucket = by_type.setdefault(res.type_url, {})
        if res.name in bucket:
            raise ConsistencyError(f"duplicate {types.SHORT_NAMES.get(res.type_url)} {res.name!r}")
        bucket[res.name] = res
    contents = {
        t: _content(t, tuple(res for _, res in sorted(bucket.items())))
        for t, bucket in by_type.items()
    }
    frozen = MappingProxyType({t: c.resources for t, c in contents.items()})
    _check_consistent(frozen)
    versions = MappingProxyType({t: c.version for t, c in contents.items()})
    return Snapshot(policy_version, frozen, versions, MappingProxyType(contents))


def _content(type_url: str, ordered: tuple[Resource, ...]) -> TypeContent:
    """The interned content of one type (resources in name order), found by its version: a
    digest of the names and content versions, so equal versions are equal content (the
    protocol relies on that already). Keys of strings only: nothing more for the collector."""
    bucket = MappingProxyType({res.name: res for res in ordered})
    key = (type_url, _content_digest(bucket))
    content = _CONTENTS.get(key)
    if content is None:
        content = _CONTENTS.setdefault(key, TypeContent(type_url, bucket, key[1]))
    return content


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

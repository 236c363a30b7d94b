"""Immutable, checked snapshots: every resource a node group should have, serialised once.

Versions are content hashes of the deterministic encoding, prefixed with the policy version, so
replicas serving the same policy agree and an unchanged resource keeps its version.
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
class Resource:
    """One named resource with its packed bytes and content version."""

    name: str
    type_url: str
    message: Message
    any_bytes: bytes  # serialised google.protobuf.Any
    version: str
    delta_bytes: bytes  # serialised envoy.service.discovery.v3.Resource

    @classmethod
    def build(cls, name: str, message: Message) -> Resource:
        type_url = "type.googleapis.com/" + message.DESCRIPTOR.full_name
        payload = message.SerializeToString(deterministic=True)
        version = hashlib.sha256(payload).hexdigest()[:16]
        packed = any_pb2.Any(type_url=type_url, value=payload)
        any_bytes = packed.SerializeToString(deterministic=True)
        delta = discovery_pb2.Resource(name=name, version=version)
        delta_bytes = delta.SerializeToString(deterministic=True) + length_delimited(2, any_bytes)
        return cls(name, type_url, message, any_bytes, version, delta_bytes)


@dataclass(frozen=True)
class Snapshot:
    """Everything one node group is served. Built whole, checked, never mutated."""

    policy_version: str
    resources: Mapping[str, Mapping[str, Resource]]
    type_versions: Mapping[str, str]
    _sotw_cache: dict[tuple[str, frozenset[str] | None], bytes] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def build(cls, policy_version: str, resources: Iterable[Resource]) -> Snapshot:
        by_type: dict[str, dict[str, Resource]] = {t: {} for t in types.TYPE_ORDER}
        for res in resources:
            bucket = by_type.setdefault(res.type_url, {})
            if res.name in bucket:
                raise ConsistencyError(
                    f"duplicate {types.SHORT_NAMES.get(res.type_url)} {res.name!r}"
                )
            bucket[res.name] = res
        frozen = {
            t: MappingProxyType(dict(sorted(bucket.items()))) for t, bucket in by_type.items()
        }
        versions = {t: _type_version(policy_version, bucket) for t, bucket in frozen.items()}
        snap = cls(policy_version, MappingProxyType(frozen), MappingProxyType(versions))
        snap.check_consistent()
        return snap

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, MappingProxyType({}))

    def version(self, type_url: str) -> str:
        return self.type_versions.get(type_url, self.policy_version)

    def check_consistent(self) -> None:
        """Every EDS name a cluster needs and every route a listener names must be present."""
        missing: list[str] = []
        endpoints = self.of_type(types.ENDPOINT)
        for cluster in self.of_type(types.CLUSTER).values():
            assert isinstance(cluster.message, cluster_pb2.Cluster)
            if cluster.message.type == cluster_pb2.Cluster.EDS:
                eds = cluster.message.eds_cluster_config.service_name or cluster.name
                if eds not in endpoints:
                    missing.append(f"cluster {cluster.name!r} needs endpoints {eds!r}")
        routes = self.of_type(types.ROUTE)
        for listener in self.of_type(types.LISTENER).values():
            assert isinstance(listener.message, listener_pb2.Listener)
            for name in _route_names(listener.message):
                if name not in routes:
                    missing.append(f"listener {listener.name!r} needs route {name!r}")
        if missing:
            raise ConsistencyError("inconsistent snapshot: " + "; ".join(missing))

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


def _type_version(policy_version: str, bucket: Mapping[str, Resource]) -> str:
    digest = hashlib.sha256()
    for name, res in bucket.items():
        digest.update(name.encode() + b"\0" + res.version.encode() + b"\n")
    return f"{policy_version}-{digest.hexdigest()[:12]}"


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

"""Model -> one snapshot per node group."""

from __future__ import annotations

from meshgate.policy.model import PolicyModel
from meshgate.xds.gateway import gateway_resources
from meshgate.xds.nodes import GATEWAY_GROUP
from meshgate.xds.options import TranslateOptions
from meshgate.xds.snapshot import Resource, Snapshot


def resource_name(message: object) -> str:
    name = getattr(message, "name", "") or getattr(message, "cluster_name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"resource without a name: {type(message).__name__}")
    return name


def gateway_snapshot(model: PolicyModel, options: TranslateOptions) -> Snapshot:
    resources = [Resource.build(resource_name(m), m) for m in gateway_resources(model, options)]
    return Snapshot.build(model.version, resources)


def build_snapshots(
    model: PolicyModel, options: TranslateOptions | None = None
) -> dict[str, Snapshot]:
    """Every node group's snapshot for this policy."""
    return {GATEWAY_GROUP: gateway_snapshot(model, options or TranslateOptions())}

"""Relative file paths in a policy (caFile, secrets.path, consul.caFile) mean "relative to the
policy root".

Resolved once at load time so Envoy, which has its own working directory, gets absolute paths.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePath

from meshgate.policy.model import PolicyModel


def resolve_relative_paths(model: PolicyModel, root: PurePath) -> PolicyModel:
    destinations = tuple(
        dataclasses.replace(d, ca_file=str(root / d.ca_file))
        if d.ca_file and not PurePath(d.ca_file).is_absolute()
        else d
        for d in model.destinations
    )
    secrets = model.mesh.secrets
    if secrets.path and not PurePath(secrets.path).is_absolute():
        secrets = dataclasses.replace(secrets, path=str(root / secrets.path))
    consul = model.mesh.consul
    if consul and consul.ca_file and not PurePath(consul.ca_file).is_absolute():
        consul = dataclasses.replace(consul, ca_file=str(root / consul.ca_file))
    mesh = dataclasses.replace(model.mesh, secrets=secrets, consul=consul)
    return dataclasses.replace(model, destinations=destinations, mesh=mesh)

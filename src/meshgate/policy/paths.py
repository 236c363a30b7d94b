"""Relative file paths in a policy (caFile, secrets.path) mean "relative to the policy root".

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
    mesh = dataclasses.replace(model.mesh, secrets=secrets)
    return dataclasses.replace(model, destinations=destinations, mesh=mesh)

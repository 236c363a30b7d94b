"""One exception hierarchy, so the CLI can turn any expected failure into a one-line message."""

from __future__ import annotations


class MeshgateError(Exception):
    """Base for every error meshgate reports to a user instead of a traceback."""


class ConfigError(MeshgateError):
    """Bad command-line input or settings."""


class PolicyError(MeshgateError):
    """A policy that cannot be loaded; carries every problem found, each with file:line:col."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class EnvoyError(MeshgateError):
    """Envoy could not be found, started, or did not become ready."""


class ConsistencyError(MeshgateError):
    """A snapshot references resources it does not contain."""

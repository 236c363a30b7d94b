"""A policy repository in git: committed changes reach a running Envoy, versions are commits."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from builders import free_port
from harness import control_plane, gateway, until, upstream, via_gateway, write_policy

from meshgate.controlplane.sources import GitSource

pytestmark = pytest.mark.e2e


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        text=True,
        env={
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
            "PATH": "/usr/bin:/bin",
        },
    ).stdout.strip()


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


async def test_committed_change_reaches_envoy_and_commit_is_the_version(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    listen = free_port()
    async with upstream("alpha") as up_a, upstream("beta") as up_b:
        write_policy(repo, listen, {"alpha": up_a.port})
        first = commit(repo, "alpha")
        source = GitSource(f"git+file://{repo}@main", tmp_path / "cache", interval=0.2)
        async with control_plane(repo, tmp_path / "state", source) as cp, gateway(cp, tmp_path):
            assert cp.policy.model is not None and cp.policy.model.version == first
            [node] = cp.registry.connections()
            await until(
                lambda: all(node.policy_acked(t) == first for t in node.types),
                what="ACK of first commit",
            )
            assert (await via_gateway(listen, "alpha.internal")).status_code == 200

            # an uncommitted edit is never served
            write_policy(repo, listen, {"alpha": up_a.port, "beta": up_b.port})
            await asyncio.sleep(0.8)
            assert (await via_gateway(listen, "beta.internal")).status_code == 403

            second = commit(repo, "beta")

            async def beta_routes() -> bool:
                return (await via_gateway(listen, "beta.internal")).status_code == 200

            await until(beta_routes, timeout=10, what="committed change to route")
            assert cp.policy.model.version == second

            # a bad commit is refused whole; the last good commit keeps serving
            (repo / "agents.yaml").write_text(
                (repo / "agents.yaml").read_text().replace("destination: beta", "destination: gh")
            )
            bad = commit(repo, "typo")
            await until(lambda: cp.policy.rejection is not None, what="rejection of bad commit")
            assert cp.policy.model.version == second
            assert cp.policy.rejection is not None
            assert cp.policy.rejection.origin == f"git:{bad[:12]}"
            assert any('unknown destination "gh"' in p for p in cp.policy.rejection.problems)
            assert (await via_gateway(listen, "beta.internal")).status_code == 200

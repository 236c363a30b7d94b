"""Snapshot cache: the current snapshot of every node group, and who to wake when one changes.

Versions are content hashes (xds/snapshot.py), so "changed" means some type's content for that
group changed; a policy change that touches one agent wakes that agent's group and the gateways.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from meshgate.xds.snapshot import Snapshot

Watcher = Callable[[], None]


class SnapshotCache:
    """Holds one immutable snapshot per node group; the servers depend only on get/watch."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, set[Watcher]] = {}

    def get(self, group: str) -> Snapshot | None:
        return self._snapshots.get(group)

    def groups(self) -> list[str]:
        return sorted(self._snapshots)

    def set_snapshots(self, snapshots: Mapping[str, Snapshot]) -> list[str]:
        """Replace every group's snapshot; wake only streams whose group changed. Returns them."""
        changed = []
        for group in sorted(set(snapshots) | set(self._snapshots)):
            old, new = self._snapshots.get(group), snapshots.get(group)
            if _versions(old) != _versions(new):
                changed.append(group)
            if old is not None and new is not None and old is not new:
                new.keep_bodies(old)
        self._snapshots = dict(snapshots)
        for group in changed:
            for wake in list(self._watchers.get(group, ())):
                wake()
        return changed

    def watch(self, group: str, wake: Watcher) -> Callable[[], None]:
        """Call `wake` whenever the group's snapshot changes; returns the cancel function."""
        self._watchers.setdefault(group, set()).add(wake)

        def cancel() -> None:
            watchers = self._watchers.get(group)
            if watchers is not None:
                watchers.discard(wake)
                if not watchers:
                    del self._watchers[group]

        return cancel


def _versions(snapshot: Snapshot | None) -> Mapping[str, str] | None:
    return None if snapshot is None else snapshot.type_versions

"""Snapshot cache: the current snapshot of every node group, and who to wake when one changes.

Versions are content hashes (xds/snapshot.py), so "changed" means some type's content for that
group changed; a policy change that touches one agent wakes that agent's group and the gateways.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from meshgate.xds.snapshot import Snapshot

# called with the number of groups the change touched (small changes are pushed first)
Watcher = Callable[[int], None]


class SnapshotCache:
    """Holds one immutable snapshot per node group; the servers depend only on get/watch."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, set[Watcher]] = {}
        self.policy_version: str | None = None  # of the newest snapshots set

    def serving(self, group: str) -> tuple[Snapshot | None, str | None]:
        """The group's snapshot and the policy being served (which may be newer than the
        snapshot's own, when that policy left the group's content alone)."""
        return self._snapshots.get(group), self.policy_version

    def get(self, group: str) -> Snapshot | None:
        return self._snapshots.get(group)

    def groups(self) -> list[str]:
        return sorted(self._snapshots)

    def set_snapshots(self, snapshots: Mapping[str, Snapshot]) -> list[str]:
        """Replace every group's snapshot; wake only streams whose group changed. Returns them."""
        previous = self._snapshots
        current: dict[str, Snapshot] = {}
        changed = [group for group in previous if group not in snapshots]
        for group, new in snapshots.items():
            old = previous.get(group)
            # memoised sidecar builds hand out the same versions object: compare it first
            if old is not None and (
                old.type_versions is new.type_versions or old.type_versions == new.type_versions
            ):
                # Same content: keep the old object. The new one dies
                # young, so a policy change that touches one agent leaves the heap of 10,000
                # groups' snapshots as it was, and the collector with nothing new to scan.
                current[group] = old
            else:
                current[group] = new
                changed.append(group)
        changed.sort()
        self._snapshots = current
        for snap in snapshots.values():
            self.policy_version = snap.policy_version
            break
        for group in changed:
            for wake in list(self._watchers.get(group, ())):
                wake(len(changed))
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

"""Taking a snapshot of a bubblewrap sandbox's writable layer: frozen, copied, thawed.

Consistency: the sandbox's cgroup is frozen (the freezer of cgroup v1, `cgroup.freeze` of v2)
for the whole copy, so no process of it writes meanwhile and the copy is the state of one
instant (what a process had in flight in a write() call that the freeze interrupted is either
in the file or not, as after a crash). A sandbox that was already frozen (paused) stays frozen.
Without a freezer (no cgroups) the copy is best effort while processes write.

A service killed mid-copy would leave the sandbox frozen: the freeze is marked by the file
`FREEZE_MARK` in the sandbox's state directory, and a service that re-attaches a sandbox with
that mark thaws it (`thaw_if_marked`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from aviato.runtime.base import LimitsUnavailable, SnapshotFacts
from aviato.runtime.cgroups import CgroupError, SandboxCgroup
from aviato.runtime.snapshot_store import SnapshotStore
from aviato.runtime.userns import IdRange

__all__ = ["FREEZE_MARK", "take_snapshot", "thaw_if_marked"]

FREEZE_MARK = "frozen-for-snapshot"

_FREEZE_WAIT_S = 5.0
log = logging.getLogger("aviato.runtime.snapshots")


async def take_snapshot(
    store: SnapshotStore,
    directory: Path,
    snapshot_id: str,
    bwrap_pid: int,
    cgroup: SandboxCgroup | None,
    ids: IdRange | None,
    max_bytes: int,
) -> SnapshotFacts:
    """Copies the layer of the sandbox whose bwrap is `bwrap_pid` into snapshot `snapshot_id`."""
    if ids is None:
        raise LimitsUnavailable("snapshots need the service to run as root (uid ranges)")
    was_frozen = False
    frozen = False
    if cgroup is not None and cgroup.has_freezer:
        was_frozen = cgroup.frozen()
        if not was_frozen:
            (directory / FREEZE_MARK).touch(0o600)
            try:
                await cgroup.freeze(_FREEZE_WAIT_S)
                frozen = True
            except CgroupError as e:  # best effort: copied while its processes run
                log.warning("snapshot %s: copying without freezing: %s", snapshot_id, e)
    try:
        tree = await asyncio.to_thread(store.capture, snapshot_id, bwrap_pid, ids.base, max_bytes)
    finally:
        if frozen and cgroup is not None:
            with contextlib.suppress(CgroupError):
                cgroup.thaw()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / FREEZE_MARK)
    return SnapshotFacts(tree.size_bytes, tree.entries, tree.skipped)


def thaw_if_marked(directory: Path, cgroup: SandboxCgroup | None) -> None:
    """Thaws a sandbox that a service froze for a snapshot and did not live to thaw."""
    mark = directory / FREEZE_MARK
    if mark.exists():
        if cgroup is not None and cgroup.has_freezer:
            with contextlib.suppress(CgroupError):
                cgroup.thaw()
        mark.unlink(missing_ok=True)

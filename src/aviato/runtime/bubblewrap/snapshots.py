"""Taking a snapshot of a bubblewrap sandbox's writable layer: frozen, copied, thawed.

Consistency: the sandbox's cgroup is frozen (the freezer of cgroup v1, `cgroup.freeze` of v2)
for the whole copy, so no process of it writes meanwhile and the copy is the state of one
instant (what a process had in flight in a write() call that the freeze interrupted is either
in the file or not, as after a crash). A sandbox that was already frozen (paused) stays frozen.
Without a freezer (no cgroups) the copy is best effort while processes write.
"""

from __future__ import annotations

import asyncio
import contextlib

from aviato.runtime.base import LimitsUnavailable, SnapshotFacts
from aviato.runtime.cgroups import SandboxCgroup
from aviato.runtime.snapshot_store import SnapshotStore
from aviato.runtime.userns import IdRange

__all__ = ["take_snapshot"]

_FREEZE_WAIT_S = 5.0


async def take_snapshot(
    store: SnapshotStore,
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
    if cgroup is not None:
        with contextlib.suppress(OSError, AssertionError):
            was_frozen = cgroup._is_frozen()
        if not was_frozen:
            frozen = await cgroup._freeze(_FREEZE_WAIT_S)
    try:
        tree = await asyncio.to_thread(store.capture, snapshot_id, bwrap_pid, ids.base, max_bytes)
    finally:
        if frozen and cgroup is not None:
            cgroup._thaw()
    return SnapshotFacts(tree.size_bytes, tree.entries, tree.skipped)

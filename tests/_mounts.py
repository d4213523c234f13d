"""Mounts that tests leave in the host's mount table, and undoing them.

A service keeps mounts in the host's mount namespace (disk layers, sized volumes, and the bind
mounts of their roots, docs/state.md) and undoes them at a graceful stop. A test that kills a
service or a sandbox on purpose must undo what the dead one left before it deletes the state
directory: `shutil.rmtree` cannot remove a mount point, and every leftover mount makes every
later bubblewrap start on the host slower (bwrap reads the whole mount table per mount).

`tests/conftest.py` records every directory the run makes with `tempfile` and fails the run
when a mount remains beneath one of them at its end (`left_mounts`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

from aviato.runtime.mount_tools import mount_points

__all__ = ["mounts_beneath", "unmount_beneath"]

_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mounts_beneath(path: Path | str) -> list[str]:
    """The host's mount points at `path` or beneath it, deepest first."""
    top = str(path).rstrip("/")
    found = [p for p in mount_points() if p == top or p.startswith(top + "/")]
    return sorted(found, key=len, reverse=True)


def unmount_beneath(path: Path | str) -> list[str]:
    """Lazily unmounts everything at `path` or beneath it (binds stacked on each other too);
    returns what was mounted there."""
    found = mounts_beneath(path)
    for _ in range(8):  # a bind stacked on another shows once per layer of the stack
        left = mounts_beneath(path)
        if not left:
            break
        for point in left:
            _libc.umount2(point.encode(), _MNT_DETACH)
    return found

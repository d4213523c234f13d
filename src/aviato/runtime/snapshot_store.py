"""Snapshot trees on this node: `<state>/snapshots/<id>/tree/`, one per snapshot.

A snapshot is a copy of a sandbox's writable layer (runtime/tree_copy.py says what is copied and
how), with the sandbox's own ids (0..65536) as owners. It is written under
`<state>/snapshots/.partial-<id>/` and renamed to `<id>/` only once complete and on disk (one
syncfs for the tree, then an fsync of the directory for its name), so a service killed
mid-copy leaves only a `.partial-` directory, which `discard_partial` removes at the next start;
the registry lists a snapshot only after the rename (server/snapshots.py).

A sandbox started from a snapshot never copies it: the tree is the read-only lower layer of an
overlay whose upper is the sandbox's own layer (runtime/writable_layers.py), seen through the
launcher's id-mapped view of the state directory. A tree must therefore never change while a
sandbox uses it; the service refuses to delete a snapshot in use.

What the runtime does not know: who owns a snapshot (the registry's owner column).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from aviato._private import private_dir
from aviato.runtime.base import SandboxGone, SandboxRuntimeError
from aviato.runtime.tree_copy import CopyRefused, copy_tree
from aviato.runtime.userns import COUNT

__all__ = ["SNAPSHOT_ID", "SnapshotNotFound", "SnapshotStore", "SnapshotTree"]

SNAPSHOT_ID = re.compile(r"^snap-[a-z0-9]{8,64}$")
MAX_SNAPSHOT_ENTRIES = 2_000_000
NOBODY = 65534
_PARTIAL = ".partial-"
_LIBC = ctypes.CDLL(None, use_errno=True)


def _sync_filesystem(fd: int) -> None:
    """syncfs(2) of the filesystem that holds `fd`: every file of a new tree on disk in one
    call (cheaper than an fsync per file, and the same guarantee for the tree)."""
    if _LIBC.syncfs(fd) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


class SnapshotNotFound(SandboxRuntimeError):
    code = "NOT_FOUND"


class SnapshotTooLarge(SandboxRuntimeError):
    code = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class SnapshotTree:
    """What a capture wrote: data bytes (holes not counted), entries, entries left out."""

    snapshot_id: str
    size_bytes: int
    entries: int
    skipped: int


def _unescape(text: str) -> str:
    """A mountinfo path field: spaces, tabs, newlines and backslashes are octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_points(pid: int) -> frozenset[str]:
    """The mount points of process `pid`'s mount namespace, relative to its root ("usr")."""
    points: set[str] = set()
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                point = _unescape(fields[4]).strip("/")
                if point:
                    points.add(point)
    return frozenset(points)


def sandbox_init_pid(bwrap_pid: int) -> int:
    """The host pid of the sandbox's PID 1: the child of its bwrap (the host-side monitor)."""
    try:
        with open(f"/proc/{bwrap_pid}/task/{bwrap_pid}/children", encoding="ascii") as f:
            children = f.read().split()
    except OSError as exc:
        raise SandboxGone(f"the sandbox's processes are gone: {exc.strerror}") from exc
    if not children:
        raise SandboxGone("the sandbox has no running init process")
    return int(children[0])


class SnapshotStore:
    """The snapshot trees of one runtime, under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = private_dir(Path(root))

    def _checked(self, snapshot_id: str) -> str:
        if not SNAPSHOT_ID.match(snapshot_id):
            raise SnapshotNotFound(f"snapshot {snapshot_id!r} not found")
        return snapshot_id

    def tree(self, snapshot_id: str) -> Path:
        return self.root / self._checked(snapshot_id) / "tree"

    def exists(self, snapshot_id: str) -> bool:
        return SNAPSHOT_ID.match(snapshot_id) is not None and self.tree(snapshot_id).is_dir()

    def ids(self) -> list[str]:
        with contextlib.suppress(OSError):
            return sorted(e.name for e in os.scandir(self.root) if SNAPSHOT_ID.match(e.name))
        return []

    def discard_partial(self) -> None:
        """Removes what captures interrupted by the end of a service left behind."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root):
                if entry.name.startswith(_PARTIAL):
                    shutil.rmtree(entry.path, ignore_errors=True)

    def delete(self, snapshot_id: str) -> None:
        """Removes the tree: renamed away first, so that it is gone at once even if the
        removal of its files is interrupted (`discard_partial` finishes it)."""
        source = self.root / self._checked(snapshot_id)
        doomed = self.root / f"{_PARTIAL}deleted-{snapshot_id}-{time.monotonic_ns()}"
        try:
            os.rename(source, doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def capture(
        self, snapshot_id: str, bwrap_pid: int, uid_base: int, max_bytes: int
    ) -> SnapshotTree:
        """Copies the writable layer of the sandbox whose bwrap is `bwrap_pid` (its ids are host
        ids `uid_base`...) into the snapshot `snapshot_id`. Blocking: run it in a thread, with
        the sandbox frozen for a consistent copy. Raises SnapshotTooLarge beyond `max_bytes`."""
        self._checked(snapshot_id)
        pid = sandbox_init_pid(bwrap_pid)
        skip = mount_points(pid)
        partial = self.root / f"{_PARTIAL}{snapshot_id}"
        os.mkdir(partial, 0o700)
        try:
            os.mkdir(partial / "tree", 0o755)
            src = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                dst = os.open(partial / "tree", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    counts = copy_tree(
                        src, dst, skip=skip,
                        to_own_id=lambda kid: kid - uid_base
                        if uid_base <= kid < uid_base + COUNT else NOBODY,
                        max_bytes=max_bytes, max_entries=MAX_SNAPSHOT_ENTRIES,
                    )  # fmt: skip
                    st = os.fstat(src)
                    os.fchmod(dst, st.st_mode & 0o7777 & ~0o6000)
                    _sync_filesystem(dst)  # the files are on disk before the tree has a name
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            os.rename(partial, self.root / snapshot_id)
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(root)  # and the name is, before the service records the snapshot
            finally:
                os.close(root)
        except CopyRefused as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise SnapshotTooLarge(f"cannot snapshot: {exc.strerror}") from exc
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return SnapshotTree(snapshot_id, counts.data_bytes, counts.entries, counts.skipped)

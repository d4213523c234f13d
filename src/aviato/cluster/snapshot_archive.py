"""A snapshot's tree as a tar stream, and back: how a snapshot moves from one node to another.

`write_archive` (on the node that holds the tree) walks `snapshots/<id>/tree/` with descriptors,
one directory of the current path open at a time, following no symlink, and writes a PAX tar:
directories, regular files (holes written out as zeros), symlinks with their text, fifos, hard
links within the tree as tar hard links to the entry first seen, owners as numbers (the
sandbox's own ids, as the tree holds them), modes and modification times. Nothing else is in a
tree (runtime/tree_copy.py leaves devices and sockets out).

`unpack_archive` (on the node that receives it) treats the stream as hostile: a sandbox made
every name, link text and byte of the tree. The archive is spooled to
`snapshots/.partial-import-<id>/archive.tar` while counting (at most the bound the source's
facts give: its data bytes, plus a header allowance per entry), then applied with the image
layers' unpacker (images/unpack.py: every entry made beneath the root's descriptor one
component at a time, absolute names and `..` refused, symlinks never followed out of the root,
hard links only to files inside it, devices skipped, set-id bits dropped, header records
bounded) without whiteouts (a file named `.wh.x` in a sandbox is a file) into
`snapshots/.partial-<id>/tree`, renamed to `snapshots/<id>/` once complete. A node host killed
meanwhile leaves only `.partial-` names, which its runtime removes at the next start
(snapshot_store.discard_partial).

Sparse files: the tree keeps holes, the archive does not (tarfile writes no sparse maps and the
unpacker refuses them), so a snapshot whose files are mostly holes exceeds the bound of its data
bytes and is refused in words: it starts on the node that holds it. The source refuses first
(`write_archive` with the bound stops before a byte beyond it), so that the words reach the user
on the export's stream; had only the receiver refused, it would end its call while the service
still writes to it, and the service's gRPC core reports that write's failure ("Internal error
from Core") in place of the receiver's status, whichever comes first. The receiver keeps its
own bound (`Spool`): a source is not trusted to keep to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aviato.images.beneath import MAX_DEPTH
from aviato.images.errors import ImageError
from aviato.images.limits import ImageTooLarge, PullBudget, PullLimits, format_size
from aviato.images.unpack import apply_layer
from aviato.runtime.base import SandboxRuntimeError, SnapshotFacts
from aviato.runtime.snapshot_store import SnapshotNotFound, SnapshotStore

__all__ = [
    "ArchiveRefused",
    "archive_bound",
    "read_facts",
    "unpack_archive",
    "write_archive",
    "write_facts",
]

CHUNK_BYTES = 1 << 20
# Tar bytes an entry may take beyond its data: a header block, a PAX record (long names up to
# 4096 bytes, times, ids) and padding. Generous; the bound is about disk, not exactness.
HEADER_ALLOWANCE = 10 << 10
FACTS_FILE = "facts.json"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_PARTIAL = ".partial-"


class ArchiveRefused(SandboxRuntimeError):
    """The snapshot cannot be moved: the archive breaks a wall or a bound (said in words)."""

    code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class Bound:
    tar_bytes: int
    entries: int


def archive_bound(facts: SnapshotFacts) -> Bound:
    """What an archive of a snapshot with these facts may hold at most."""
    entries = max(0, facts.entries) + 16
    return Bound(max(0, facts.size_bytes) + entries * HEADER_ALLOWANCE + (1 << 20), entries)


# --- facts kept beside a tree ------------------------------------------------------------------


def write_facts(store: SnapshotStore, snapshot_id: str, facts: SnapshotFacts) -> None:
    """Keeps a snapshot's facts in `snapshots/<id>/facts.json` (what bounds its transfer)."""
    path = store.tree(snapshot_id).parent / FACTS_FILE
    plain = {"size_bytes": facts.size_bytes, "entries": facts.entries, "skipped": facts.skipped}
    partial = path.with_name(FACTS_FILE + ".tmp")
    partial.write_text(json.dumps(plain))
    os.replace(partial, path)


def read_facts(store: SnapshotStore, snapshot_id: str) -> SnapshotFacts:
    if not store.exists(snapshot_id):
        raise SnapshotNotFound(f"snapshot {snapshot_id} is not on this node")
    try:
        plain = json.loads((store.tree(snapshot_id).parent / FACTS_FILE).read_text())
        return SnapshotFacts(int(plain["size_bytes"]), int(plain["entries"]),
                             int(plain["skipped"]))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArchiveRefused(
            f"snapshot {snapshot_id}: its facts on this node are unreadable ({e}), so its size "
            "is unknown and it is not sent to another node"
        ) from None


# --- writing -----------------------------------------------------------------------------------


def _larger_than_bound(snapshot_id: str, bound: Bound) -> ArchiveRefused:
    return ArchiveRefused(
        f"snapshot {snapshot_id}: its archive is larger than its data and headers may take "
        f"({format_size(bound.tar_bytes)}); a snapshot of sparse files cannot move to another "
        "node: start it on the node that holds it"
    )


class _Sink:
    """Gathers the archive's bytes into CHUNK_BYTES pieces for `emit`; with a bound, refuses
    (ArchiveRefused) before it emits a byte beyond it."""

    def __init__(
        self, emit: Callable[[bytes], None], bound: Bound | None, snapshot_id: str
    ) -> None:
        self._emit = emit
        self._buf = bytearray()
        self._bound = bound
        self._snapshot_id = snapshot_id
        self._emitted = 0

    def write(self, data: bytes | memoryview) -> None:
        self._buf += data
        if len(self._buf) >= CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        self._emitted += len(self._buf)
        if self._bound is not None and self._emitted > self._bound.tar_bytes:
            raise _larger_than_bound(self._snapshot_id, self._bound)
        self._emit(bytes(self._buf))
        self._buf.clear()


def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = st.st_mtime_ns / 1e9
    return info


def write_archive(
    tree: Path, emit: Callable[[bytes], None], bound: Bound | None = None, snapshot_id: str = ""
) -> int:
    """Writes the tree at `tree` as a tar archive to `emit` in pieces; returns its entries.
    With `bound` (the receiver's: `archive_bound` of the snapshot's facts), raises
    ArchiveRefused instead of emitting more than it. Blocking: run it in a thread."""
    sink = _Sink(emit, bound, snapshot_id)
    links: dict[tuple[int, int], str] = {}
    entries = 0
    root = os.open(tree, _DIR)
    # The current path: (its descriptor, its name with a trailing '/', its entries left).
    path: list[tuple[int, str, list[str]]] = [(root, "", sorted(os.listdir(root), reverse=True))]
    try:
        while path:
            fd, prefix, left = path[-1]
            if not left:
                os.close(fd)
                path.pop()
                continue
            name = left.pop()
            rel = prefix + name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            entries += 1
            if stat.S_ISDIR(st.st_mode):
                if len(path) > MAX_DEPTH:
                    raise ArchiveRefused(
                        f"directory {rel[:200]!r} is deeper than {MAX_DEPTH} levels, more than "
                        "a snapshot may have to move to another node"
                    )
                sink.write(_info(rel, st, tarfile.DIRTYPE).tobuf(tarfile.PAX_FORMAT))
                child = os.open(name, _DIR, dir_fd=fd)
                path.append((child, rel + "/", sorted(os.listdir(child), reverse=True)))
            elif stat.S_ISLNK(st.st_mode):
                info = _info(rel, st, tarfile.SYMTYPE)
                info.linkname = os.readlink(name, dir_fd=fd)
                sink.write(info.tobuf(tarfile.PAX_FORMAT))
            elif stat.S_ISFIFO(st.st_mode):
                sink.write(_info(rel, st, tarfile.FIFOTYPE).tobuf(tarfile.PAX_FORMAT))
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in links:
                    info = _info(rel, st, tarfile.LNKTYPE)
                    info.linkname = links[key]
                    sink.write(info.tobuf(tarfile.PAX_FORMAT))
                    continue
                if st.st_nlink > 1:
                    links[key] = rel
                _write_file(fd, name, rel, st, sink)
            else:
                entries -= 1  # no device or socket is ever in a tree; never sent
        sink.write(bytes(2 * tarfile.BLOCKSIZE))
        sink.flush()
    finally:
        for fd, _, _ in path:
            os.close(fd)
    return entries


def _write_file(dir_fd: int, name: str, rel: str, st: os.stat_result, sink: _Sink) -> None:
    info = _info(rel, st, tarfile.REGTYPE)
    info.size = st.st_size
    src = os.open(name, _FILE, dir_fd=dir_fd)
    try:
        sink.write(info.tobuf(tarfile.PAX_FORMAT))
        left = st.st_size
        while left:
            data = os.read(src, min(CHUNK_BYTES, left))
            if not data:  # never shrinks (a tree does not change): keep the archive whole
                data = bytes(min(CHUNK_BYTES, left))
            sink.write(data)
            left -= len(data)
        sink.write(bytes(-st.st_size % tarfile.BLOCKSIZE))
    finally:
        os.close(src)


# --- reading -----------------------------------------------------------------------------------


class _SnapshotBudget(PullBudget):
    """A pull budget whose refusals speak of the snapshot."""

    def _too_large(self, why: str) -> ImageTooLarge:
        return _Refused(
            f"{self.image}: {why} than its data and headers may take "
            f"({format_size(self.limits.max_image_bytes)}); a snapshot of sparse files "
            "cannot move to another node: start it on the node that holds it"
        )

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_image_entries:
            raise _Refused(f"{self.image}: more entries than the snapshot has")


class _Refused(ImageTooLarge):
    code = "FAILED_PRECONDITION"


class Spool:
    """The archive being received, in `snapshots/.partial-import-<id>/archive.tar` (a
    directory, so that the runtime's discard_partial removes it after a crash), held to the
    bound."""

    def __init__(self, store: SnapshotStore, snapshot_id: str, bound: Bound) -> None:
        self._dir = store.root / f"{_PARTIAL}import-{snapshot_id}"
        shutil.rmtree(self._dir, ignore_errors=True)
        os.mkdir(self._dir, 0o700)
        self.path = self._dir / "archive.tar"
        self._bound = bound
        self._snapshot_id = snapshot_id
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._bound.tar_bytes:
            raise _larger_than_bound(self._snapshot_id, self._bound)
        self._file.write(data)

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def unpack_archive(
    store: SnapshotStore,
    snapshot_id: str,
    spool: Spool,
    facts: SnapshotFacts,
    min_free_disk: int = 0,
) -> None:
    """Makes the snapshot `snapshot_id` from the spooled archive (see the module docstring).
    Blocking: run it in a thread. The spool is removed in every case."""
    bound = archive_bound(facts)
    partial = store.root / f"{_PARTIAL}{snapshot_id}"
    try:
        spool.close()
        shutil.rmtree(partial, ignore_errors=True)
        os.mkdir(partial, 0o700)
        os.mkdir(partial / "tree", 0o755)
        limits = PullLimits(bound.tar_bytes, bound.entries, min_free_disk)
        budget = _SnapshotBudget(f"snapshot {snapshot_id}", limits, store.root)
        try:
            apply_layer(spool.path, partial / "tree", keep_owner=True, budget=budget,
                        whiteouts=False)  # fmt: skip
        except ImageError as e:
            raise ArchiveRefused(f"snapshot {snapshot_id} was refused by this node: {e}") from e
        with contextlib.suppress(OSError):
            fd = os.open(partial / "tree", _DIR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.rename(partial, store.root / snapshot_id)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        spool.discard()
    write_facts(store, snapshot_id, facts)

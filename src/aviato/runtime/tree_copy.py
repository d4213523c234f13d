"""Copying a sandbox's writable layer, as its processes see it, into a snapshot's tree.

The source is a directory descriptor of the sandbox's `/` as the host reaches it
(`/proc/<pid 1 of the sandbox>/root`), so it works for every kind of layer (a tmpfs, a disk
layer, an overlay on an earlier snapshot) and reads the merged view. What is copied, and how:

- Never is a symlink followed: every step is `openat` of one name with O_NOFOLLOW below an
  already open directory, so a symlink planted in the sandbox (to `/etc/shadow`, to `..`) is
  copied as a symlink with its target text, and a directory swapped for a symlink between the
  look and the open fails the open.
- Mount points of the sandbox other than `/` are skipped (`skip`: the image's read-only trees,
  `/proc`, `/dev`, mounted files, the supervisor): only the writable layer is the sandbox's.
- Regular files keep their holes (SEEK_DATA/SEEK_HOLE): a sparse file of 1 TiB with one byte
  costs one block, and only data counts toward `max_bytes`, the bound of the whole copy.
- Hard links within the layer stay hard links; directories, fifos and symlinks are recreated;
  device nodes and sockets are left out (counted in `skipped`): a snapshot never holds a device.
- Set-user-id and set-group-id bits of files are dropped (the tree lies in the host's state
  directory; a directory's set-group-id, which only makes new files inherit the group, stays).
- Ownership is mapped from the host's view (`kuid`) to the sandbox's own ids by `to_own_id`,
  so that a snapshot is independent of the uid range of the sandbox it came from. Modes and
  modification times are kept; extended attributes and ACLs are not.

`max_entries` bounds the number of entries. The copy is not atomic: the caller writes into a
directory of its own and renames it into place when `copy_tree` returns.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["CopyCounts", "CopyRefused", "copy_tree"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_SETID = stat.S_ISUID | stat.S_ISGID


class CopyRefused(OSError):
    """The tree is larger than the copy may be (bytes or entries)."""


@dataclass
class CopyCounts:
    """What a copy did: data bytes written, entries made, entries left out (devices, sockets,
    entries that vanished or changed kind while being copied)."""

    data_bytes: int = 0
    entries: int = 0
    skipped: int = 0
    links: dict[tuple[int, int], str] = field(default_factory=dict)


def _copy_data(src: int, dst: int, size: int, counts: CopyCounts, max_bytes: int) -> None:
    """Copies the data extents of `src` into `dst` at the same offsets; holes stay holes."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        os.lseek(dst, start, os.SEEK_SET)
        position = start
        while position < end:
            want = min(_CHUNK, end - position)
            if counts.data_bytes + want > max_bytes:
                raise CopyRefused(
                    errno.EFBIG, f"the layer holds more than {max_bytes} bytes of data"
                )
            data = os.pread(src, want, position)
            if not data:
                return  # the file shrank meanwhile
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
            position += len(data)
            counts.data_bytes += len(data)
        offset = end


def _own(dst_dir: int, name: str, st: os.stat_result, ids: Callable[[int], int]) -> None:
    os.chown(name, ids(st.st_uid), ids(st.st_gid), dir_fd=dst_dir, follow_symlinks=False)


def _copy_file(
    src_dir: int,
    dst_dir: int,
    name: str,
    st: os.stat_result,
    ids: Callable[[int], int],
    counts: CopyCounts,
    max_bytes: int,
) -> bool:
    try:
        src = os.open(name, _READ_FLAGS, dir_fd=src_dir)
    except OSError:
        return False
    try:
        now = os.fstat(src)
        if not stat.S_ISREG(now.st_mode) or now.st_ino != st.st_ino:
            return False  # replaced between the look and the open
        dst = os.open(name, _WRITE_FLAGS, 0o600, dir_fd=dst_dir)
        try:
            _copy_data(src, dst, now.st_size, counts, max_bytes)
            os.ftruncate(dst, now.st_size)
            os.fchown(dst, ids(now.st_uid), ids(now.st_gid))
            os.fchmod(dst, stat.S_IMODE(now.st_mode) & ~_SETID)
            os.utime(dst, ns=(now.st_atime_ns, now.st_mtime_ns))
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return True


def copy_tree(
    src_root: int,
    dst_root: int,
    *,
    skip: frozenset[str],
    to_own_id: Callable[[int], int],
    max_bytes: int,
    max_entries: int,
) -> CopyCounts:
    """Copies everything below the directory `src_root` into the empty directory `dst_root`
    (both descriptors; neither is closed). `skip`: paths relative to the source ("usr",
    "proc/sys") not to copy. Raises CopyRefused beyond `max_bytes` or `max_entries`."""
    counts = CopyCounts()
    dir_times: list[tuple[str, int, int]] = []
    stack: list[tuple[int, int, str]] = [(os.dup(src_root), os.dup(dst_root), "")]
    try:
        while stack:
            src_dir, dst_dir, rel = stack.pop()
            try:
                _copy_entries(src_dir, dst_dir, dst_root, rel, skip, to_own_id, counts,
                              max_bytes, max_entries, stack, dir_times)  # fmt: skip
            finally:
                os.close(src_dir)
                os.close(dst_dir)
    finally:
        for src_dir, dst_dir, _ in stack:
            os.close(src_dir)
            os.close(dst_dir)
    for rel, atime, mtime in reversed(dir_times):  # children first: their writes are done
        os.utime(rel, ns=(atime, mtime), dir_fd=dst_root, follow_symlinks=False)
    return counts


def _copy_entries(
    src_dir: int,
    dst_dir: int,
    dst_root: int,
    rel: str,
    skip: frozenset[str],
    ids: Callable[[int], int],
    counts: CopyCounts,
    max_bytes: int,
    max_entries: int,
    stack: list[tuple[int, int, str]],
    dir_times: list[tuple[str, int, int]],
) -> None:
    with os.scandir(src_dir) as entries:
        names = [entry.name for entry in entries]
    for name in names:
        path = f"{rel}/{name}" if rel else name
        if path in skip:
            continue
        try:
            st = os.lstat(name, dir_fd=src_dir)
        except OSError:
            counts.skipped += 1
            continue
        counts.entries += 1
        if counts.entries > max_entries:
            raise CopyRefused(errno.EFBIG, f"the layer holds more than {max_entries} entries")
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=src_dir)
            except OSError:
                counts.skipped += 1
                continue
            try:
                os.mkdir(name, 0o700, dir_fd=dst_dir)
                _own(dst_dir, name, st, ids)
                os.chmod(name, stat.S_IMODE(mode) & ~stat.S_ISUID, dir_fd=dst_dir)
                made = os.open(name, _DIR_FLAGS, dir_fd=dst_dir)
            except BaseException:
                os.close(child)
                raise
            stack.append((child, made, path))
            dir_times.append((path, st.st_atime_ns, st.st_mtime_ns))
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            first = counts.links.get(key) if st.st_nlink > 1 else None
            if first is not None:
                os.link(first, name, src_dir_fd=dst_root, dst_dir_fd=dst_dir,
                        follow_symlinks=False)  # fmt: skip
                continue
            if not _copy_file(src_dir, dst_dir, name, st, ids, counts, max_bytes):
                counts.skipped += 1
                continue
            if st.st_nlink > 1:
                counts.links[key] = path
        elif stat.S_ISLNK(mode):
            try:
                target = os.readlink(name, dir_fd=src_dir)
            except OSError:
                counts.skipped += 1
                continue
            os.symlink(target, name, dir_fd=dst_dir)
            _own(dst_dir, name, st, ids)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir,
                     follow_symlinks=False)  # fmt: skip
        elif stat.S_ISFIFO(mode):
            os.mkfifo(name, 0o600, dir_fd=dst_dir)
            _own(dst_dir, name, st, ids)
            os.chmod(name, stat.S_IMODE(mode) & ~_SETID, dir_fd=dst_dir)
        else:  # devices, sockets
            counts.skipped += 1

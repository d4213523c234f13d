"""The local side of directory transfers: a local tree read into a tar stream
(`Sandbox.upload_dir`) and a tar stream written out into a local tree (`Sandbox.download_dir`).

What comes down is written by a sandbox, so it is treated as hostile (docs/security.md, "Tree
downloads"): every entry passes `aviato.v1.tar_stream`'s checks (plain relative names; files,
directories and symlinks only), and is then written by walking from the target's descriptor one
component at a time with O_NOFOLLOW: a symlink, planted in the target beforehand or by an earlier
entry of the same stream, is never followed; an entry that would go through one is refused.
Files are written to a temporary name and renamed into place (a symlink of the same name is
replaced, not written through). Symlinks are made as symlinks, whatever their target. Modes are
kept less set-id and sticky bits; directory modes and times are applied at the end. Local reads
never follow a symlink either: one in the local tree is sent as a symlink. Devices, FIFOs and
sockets are left out on both sides.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Generator

from aviato.v1.tar_stream import END, TarEntry, TarError, TarParser, header, padding

__all__ = ["LocalTreeWriter", "local_tree_chunks"]

CHUNK = 256 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def local_tree_chunks(root: str) -> Generator[bytes, None, None]:
    """The tar stream of the local directory `root`, in pieces of about CHUNK bytes; follows
    no symlink below `root` (blocking: run it in a thread)."""
    out = bytearray()
    st = os.stat(root)
    out += header(TarEntry("", "dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns))
    stack = [""]
    while stack:
        rel = stack.pop()
        subdirs = []
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            est = e.stat(follow_symlinks=False)
            mode = stat.S_IMODE(est.st_mode)
            if stat.S_ISDIR(est.st_mode):
                out += header(TarEntry(name, "dir", mode, est.st_mtime_ns))
                subdirs.append(name)
            elif stat.S_ISLNK(est.st_mode):
                target = os.readlink(e.path)
                out += header(TarEntry(name, "symlink", mode, est.st_mtime_ns, 0, target))
            elif stat.S_ISREG(est.st_mode):
                fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    size = os.fstat(fd).st_size
                    out += header(TarEntry(name, "file", mode, est.st_mtime_ns, size))
                    sent = 0
                    while sent < size:  # exactly `size` bytes: cut, or zeros if it shrank
                        data = os.read(fd, min(CHUNK, size - sent)) or bytes(
                            min(CHUNK, size - sent)
                        )
                        out += data
                        sent += len(data)
                        if len(out) >= CHUNK:
                            yield bytes(out)
                            out.clear()
                    out += padding(size)
                finally:
                    os.close(fd)
            if len(out) >= CHUNK:
                yield bytes(out)
                out.clear()
        stack.extend(reversed(subdirs))
    out += END
    yield bytes(out)


class LocalTreeWriter:
    """Writes a tar stream's entries beneath the local directory `root` (made if missing; its
    parent must exist). Blocking: feed it from a thread."""

    def __init__(self, root: str) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(root, 0o700)
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._parser = TarParser()
        self._dirs: list[TarEntry] = []
        self._parent_rel: str | None = None
        self._parent_fd = -1
        self._file: tuple[int, int, str, TarEntry] | None = None  # fd, parent fd, tmp, entry
        self.written = 0

    def feed(self, data: bytes) -> None:
        for what, value in self._parser.feed(data):
            if what == "entry":
                self._finish_file()
                assert isinstance(value, TarEntry)
                self._entry(value)
            elif what == "data":
                assert isinstance(value, bytes) and self._file is not None
                os.write(self._file[0], value)  # regular file: writes whole
                self.written += len(value)

    def finish(self) -> None:
        self._parser.close()
        self._finish_file()
        for entry in reversed(self._dirs):
            try:
                fd = self._walk(entry.name, create=False) if entry.name else os.dup(self._root_fd)
            except (OSError, TarError):
                continue  # replaced meanwhile by something else: left as it is
            try:
                os.fchmod(fd, entry.mode & 0o777)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)

    def close(self) -> None:
        """Ends a failed transfer: the file in progress is removed; what was written stays."""
        if self._file is not None:
            fd, pfd, tmp, _ = self._file
            self._file = None
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=pfd)
        if self._parent_fd >= 0:
            os.close(self._parent_fd)
            self._parent_fd = -1
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def _walk(self, rel: str, create: bool) -> int:
        """A descriptor of the directory `rel` beneath the root, following no symlink."""
        fd = os.dup(self._root_fd)
        for part in rel.split("/"):
            try:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=fd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise TarError(f"entry {rel!r}: goes through a symlink or a file") from None
                raise
            os.close(fd)
            fd = nxt
        return fd

    def _parent(self, name: str) -> tuple[int, str]:
        rel, _, base = name.rpartition("/")
        if rel != self._parent_rel:
            if self._parent_fd >= 0:
                os.close(self._parent_fd)
                self._parent_fd = -1
            self._parent_fd = self._walk(rel, create=True) if rel else os.dup(self._root_fd)
            self._parent_rel = rel
        return self._parent_fd, base

    def _entry(self, entry: TarEntry) -> None:
        if entry.kind == "dir":
            if entry.name:
                os.close(self._walk(entry.name, create=True))
            self._dirs.append(entry)
            return
        pfd, base = self._parent(entry.name)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.stat(base, dir_fd=pfd, follow_symlinks=False).st_mode):
                raise TarError(f"entry {entry.name!r}: a directory of that name is in the way")
        if entry.kind == "symlink":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base, dir_fd=pfd)
            os.symlink(entry.target, base, dir_fd=pfd)
            ns = (entry.mtime_ns, entry.mtime_ns)
            with contextlib.suppress(OSError):
                os.utime(base, ns=ns, dir_fd=pfd, follow_symlinks=False)
            return
        tmp = f".aviato-part-{secrets.token_hex(6)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=pfd)
        self._file = (fd, pfd, tmp, entry)

    def _finish_file(self) -> None:
        if self._file is None:
            return
        fd, pfd, tmp, entry = self._file
        self._file = None
        try:
            os.fchmod(fd, entry.mode & 0o777)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)
        os.rename(tmp, entry.name.rpartition("/")[2], src_dir_fd=pfd, dst_dir_fd=pfd)

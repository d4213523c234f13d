"""Paths inside an image root, resolved and acted on through directory descriptors.

An image root is hostile ground: any of its directories may be a symlink (absolute, relative,
climbing) that a layer planted. So nothing here ever hands a path string to a call that would
let the kernel resolve more than one component. A path is walked component by component: each
directory is opened with `O_NOFOLLOW | O_DIRECTORY` relative to the descriptor of its parent;
a symlink met on the way is read (`readlinkat`) and its target is walked in turn, inside the
root, as the sandbox would see it (an absolute target starts again at the root, `..` stops at
the root). `..` never reaches the kernel: the walk pops its own stack of descriptors. Acting is
then done on a descriptor we opened ourselves (`fchmod`, `futimens`, `fchown`) or on one name
relative to the parent's descriptor with no-follow semantics (`unlinkat`, `mkdirat`,
`symlinkat`, `linkat` without AT_SYMLINK_FOLLOW).

Why not `openat2(RESOLVE_IN_ROOT)`: it would resolve a whole path in the kernel, but unpacking
must also create missing directories on the way, so the walk exists anyway, and one resolver is
one thing to get right and to test. The walk holds at most `MAX_DEPTH` descriptors.

What this cannot promise: that a root shared with another writer stays consistent. The image
roots being built are private to the service (a 0700 store), so the only writer is the unpack.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from aviato.images.errors import ImageError

__all__ = [
    "MAX_DEPTH",
    "MAX_SYMLINKS",
    "At",
    "UnsafeLayer",
    "chmod_nofollow",
    "locate",
    "open_root",
    "read_small_file",
    "remove",
    "reopen",
    "walk",
]

MAX_SYMLINKS = 40
MAX_DEPTH = 512  # directories below the root; far beyond real images, bounds descriptors held
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeLayer(ImageError):
    """A path or entry that could not be handled safely (names it and says why)."""


@dataclass
class At:
    """A directory opened beneath the root: its descriptor (owned) and its real path there."""

    fd: int
    parts: tuple[str, ...]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> At:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return "/" + "/".join(self.parts)


def open_root(path: str | os.PathLike[str]) -> int:
    """A descriptor of the root directory itself (its last component is not followed)."""
    return os.open(path, DIR_FLAGS)


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


class _Stack:
    """The directories of a walk below the root, as (name, descriptor) pairs."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.items: list[tuple[str, int]] = []

    @property
    def top(self) -> int:
        return self.items[-1][1] if self.items else self.root_fd

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.items)

    def push(self, name: str, fd: int, path: str) -> None:
        if len(self.items) >= MAX_DEPTH:
            os.close(fd)
            raise UnsafeLayer(f"{path!r}: more than {MAX_DEPTH} directories deep")
        self.items.append((name, fd))

    def pop(self) -> None:
        if self.items:
            os.close(self.items.pop()[1])

    def reset(self) -> None:
        while self.items:
            self.pop()

    def take(self) -> At:
        """The top as an At (the rest closed); a duplicate of the root when empty."""
        parts = self.parts
        if not self.items:
            return At(os.dup(self.root_fd), ())
        _, fd = self.items.pop()
        self.reset()
        return At(fd, parts)


def _resolve(
    root_fd: int, path: str, *, follow_last: bool, create: bool, mode: int = 0o755
) -> tuple[At, str]:
    """The directory holding what `path` names, and its last name ("" when `path` is a
    directory that was walked into: then At is that directory).

    Every directory component is followed (symlinks inside the root); the last component only
    with `follow_last`, and only when it is a symlink or a directory. With `create`, missing
    directories are made (mode `mode`), also where a symlink leads.
    """
    stack = _Stack(root_fd)
    pending = _split(path)
    pending.reverse()
    links = 0
    try:
        while pending:
            part = pending.pop()
            if part == "..":
                stack.pop()
                continue
            last = not pending
            if last and not follow_last:
                return stack.take(), part
            try:
                fd = os.open(part, DIR_FLAGS, dir_fd=stack.top)
            except FileNotFoundError:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, mode, dir_fd=stack.top)
                    pending.append(part)
                    continue
                if last:
                    return stack.take(), part
                raise
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                try:
                    target = os.readlink(part, dir_fd=stack.top)
                except OSError:  # not a symlink: a file, a fifo, ...
                    if last and not create:
                        return stack.take(), part
                    raise UnsafeLayer(
                        f"{path!r}: /{'/'.join((*stack.parts, part))} is not a directory"
                    ) from None
                links += 1
                if links > MAX_SYMLINKS:
                    raise UnsafeLayer(f"{path!r}: too many levels of symbolic links") from None
                if target.startswith("/"):
                    stack.reset()
                more = _split(target)
                pending.extend(reversed(more))
                continue
            stack.push(part, fd, path)
        return stack.take(), ""
    except BaseException:
        stack.reset()
        raise


def walk(root_fd: int, path: str, *, create: bool = False, mode: int = 0o755) -> At:
    """The directory `path` names inside the root, opened; symlinks followed inside the root.
    With `create`, missing directories are made. Raises FileNotFoundError when it is missing,
    UnsafeLayer when a component is not a directory or links loop."""
    at, name = _resolve(root_fd, path, follow_last=True, create=create, mode=mode)
    if name:
        at.close()
        raise UnsafeLayer(f"{path!r} is not a directory")
    return at


def locate(root_fd: int, path: str, *, follow_last: bool = False) -> tuple[At, str]:
    """(parent directory, last name) of `path`; the parent's components are followed inside
    the root, the last one only with `follow_last`. The name is "" when `path` is the root, or
    (with `follow_last`) resolves to a directory, which At then is."""
    return _resolve(root_fd, path, follow_last=follow_last, create=False)


def reopen(root_fd: int, parts: tuple[str, ...]) -> At | None:
    """The directory at the real path `parts`, walked with no symlink followed at all; None when
    any component is no longer a directory (a later entry replaced it)."""
    stack = _Stack(root_fd)
    try:
        for part in parts:
            stack.push(part, os.open(part, DIR_FLAGS, dir_fd=stack.top), "/".join(parts))
    except OSError:
        stack.reset()
        return None
    return stack.take()


def read_small_file(root_fd: int, path: str, limit: int) -> bytes | None:
    """The content of the regular file `path` (symlinks followed inside the root), or None when
    it is missing, is not a regular file (a fifo is never opened for reading), or is larger
    than `limit` bytes."""
    try:
        at, name = locate(root_fd, path, follow_last=True)
    except (OSError, UnsafeLayer):
        return None
    with at:
        if not name:
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(name, flags | os.O_PATH, dir_fd=at.fd)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
                return None
            os.close(fd)
            fd = os.open(name, flags, dir_fd=at.fd)
            if not os.path.samestat(st, os.fstat(fd)):
                return None
            chunks: list[bytes] = []
            size = 0
            while size <= limit:
                chunk = os.read(fd, min(1 << 16, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return None if size > limit else b"".join(chunks)
        except OSError:
            return None
        finally:
            os.close(fd)


def chmod_nofollow(dir_fd: int, name: str, mode: int) -> None:
    """chmod of the entry `name` of `dir_fd`, never of what a symlink there points to (a symlink
    is left alone: its mode means nothing)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISLNK(os.fstat(fd).st_mode):
            os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def _scandir_names(fd: int) -> Iterator[str]:
    with os.scandir(fd) as it:
        for entry in it:
            yield entry.name


def remove(dir_fd: int, name: str) -> None:
    """Removes the entry `name` of `dir_fd` (a file, a symlink, or a whole tree), never
    following a symlink and never leaving the tree. Directories the service's user may not
    write are made writable first (through descriptors). Missing: nothing to do."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    # Depth first over (parent fd, name, fd of the directory, names left), at most as many
    # descriptors as the tree is deep.
    stack: list[tuple[int, str, int, list[str]]] = []

    def enter(parent: int, entry: str) -> None:
        try:
            fd = os.open(entry, DIR_FLAGS, dir_fd=parent)
        except PermissionError:
            chmod_nofollow(parent, entry, 0o700)
            fd = os.open(entry, DIR_FLAGS, dir_fd=parent)
        try:
            names = list(_scandir_names(fd))
        except PermissionError:
            os.fchmod(fd, 0o700)
            names = list(_scandir_names(fd))
        stack.append((parent, entry, fd, names))

    try:
        enter(dir_fd, name)
        while stack:
            parent, entry, fd, names = stack[-1]
            if names:
                child = names.pop()
                try:
                    cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(cst.st_mode):
                    if len(stack) > MAX_DEPTH * 4:
                        raise UnsafeLayer(f"a tree deeper than {MAX_DEPTH * 4} directories")
                    enter(fd, child)
                    continue
                try:
                    os.unlink(child, dir_fd=fd)
                except PermissionError:
                    os.fchmod(fd, 0o700)
                    os.unlink(child, dir_fd=fd)
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(entry, dir_fd=parent)
            except PermissionError:
                if parent == dir_fd:
                    raise
                os.fchmod(parent, 0o700)
                os.rmdir(entry, dir_fd=parent)
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)

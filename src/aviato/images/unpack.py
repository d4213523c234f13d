"""Applies image layers (tar archives, optionally gzip-compressed) onto one root directory.

Layers come from registries and must be treated as hostile. Every path of a layer is resolved
*inside* the root as if the root were `/` (`resolve_in_root`): `..` stops at the root, and a
symlink met on the way (absolute or relative, from this layer or an earlier one) is followed
within the root, never on the host. So no entry can be written outside the root, whatever the
layer contains. Entries whose own name is absolute or climbs with `..` are refused outright
(`UnsafeLayer`): a well-formed layer never has them.

Whiteouts (OCI image spec, "Representing changes"): `.wh.NAME` removes NAME of earlier layers,
`.wh..wh..opq` empties its directory of what earlier layers put there. Entries of the layer being
applied are kept.

What is not reproduced: device nodes (skipped; a sandbox gets bubblewrap's /dev), extended
attributes and file capabilities (skipped), ownership when not running as root (files belong to
the service's user, which a rootless sandbox's user namespace maps to its uid), and permission
bits that would stop the service's own user from writing its unpack directory (owner rwx is
added to directories when not root). The root is bound read-only into sandboxes.

Why not `tarfile`'s extraction filters: the `data` filter refuses absolute symlinks, which real
images are full of (`/etc/alternatives`), and knows nothing of whiteouts or of resolving through
symlinks of earlier layers; so members are read with `tarfile` and written by this module.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from aviato.images.errors import ImageError

__all__ = ["UnsafeLayer", "apply_layer", "resolve_in_root"]

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINKS = 40
_COPY = 1 << 20


class UnsafeLayer(ImageError):
    """A layer with an entry that could not be applied safely (names the entry and why)."""


def resolve_in_root(root: str, path: str, *, follow_last: bool = True, create: bool = False) -> str:
    """The host path of `path` (relative or absolute, as seen inside `root`), inside `root`.

    Symlinks are followed as the sandbox would see them (absolute targets start again at
    `root`), `..` never leaves `root`. The last component is followed only with `follow_last`.
    With `create`, `path` names a directory: every missing component is made (mode 0755), also
    where a symlink leads (always inside `root`). Raises UnsafeLayer
    on symlink loops and on intermediate components that are not directories.
    """
    pending = [p for p in path.split("/") if p not in ("", ".")]
    pending.reverse()
    current: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if current:
                current.pop()
            continue
        host = os.path.join(root, *current, part)
        last = not pending
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            if create:
                os.mkdir(host, 0o755)
            current.append(part)
            continue
        if stat.S_ISLNK(st.st_mode) and (follow_last or not last):
            links += 1
            if links > MAX_SYMLINKS:
                raise UnsafeLayer(f"{path!r}: too many levels of symbolic links")
            target = os.readlink(host)
            if target.startswith("/"):
                current = []
            more = [p for p in target.split("/") if p not in ("", ".")]
            pending.extend(reversed(more))
            continue
        if not last and not stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(f"{path!r}: {'/'.join([*current, part])} is not a directory")
        current.append(part)
    return os.path.join(root, *current)


def _member_path(name: str) -> str:
    """The normalized relative path of a member; UnsafeLayer for absolute or climbing names."""
    if name.startswith("/"):
        raise UnsafeLayer(f"entry {name!r} has an absolute path")
    if ".." in name.split("/"):
        raise UnsafeLayer(f"entry {name!r} climbs out of the layer with '..'")
    normalized = posixpath.normpath(name)
    return "" if normalized == "." else normalized


def _remove(host: str) -> None:
    try:
        st = os.lstat(host)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(host)
    else:
        os.unlink(host)


class _HashingReader:
    """A file-like object that hashes what is read through it (the layer's diff id)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.hasher.update(data)
        return data

    def drain(self) -> None:
        while self.read(_COPY):
            pass


@contextlib.contextmanager
def _open_layer(blob: Path) -> Iterator[_HashingReader]:
    with open(blob, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                yield _HashingReader(gz)  # type: ignore[arg-type]
        elif magic == b"\x28\xb5\x2f\xfd":
            raise ImageError(f"layer {blob.name} is zstd-compressed, which is not supported yet")
        else:
            yield _HashingReader(f)


def apply_layer(blob: Path, root: Path, *, keep_owner: bool | None = None) -> str:
    """Applies the layer in `blob` onto `root`; returns the digest of its uncompressed tar.

    `keep_owner` (default: when running as root) applies the entries' uid/gid.
    """
    if keep_owner is None:
        keep_owner = os.geteuid() == 0
    base = str(root)
    created: set[str] = set()
    dir_modes: list[tuple[str, int, float]] = []
    with _open_layer(blob) as reader:
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    _apply_member(tar, member, base, created, dir_modes, keep_owner)
        except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
            if isinstance(exc, ImageError):
                raise
            raise UnsafeLayer(f"layer {blob.name} cannot be read or applied: {exc}") from exc
        reader.drain()
        diff_id = "sha256:" + reader.hasher.hexdigest()
    for host, mode, mtime in reversed(dir_modes):
        with contextlib.suppress(OSError):
            os.chmod(host, mode)
            os.utime(host, (mtime, mtime))
    return diff_id


def _apply_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    root: str,
    created: set[str],
    dir_modes: list[tuple[str, int, float]],
    keep_owner: bool,
) -> None:
    rel = _member_path(member.name)
    if not rel:
        return  # "./": the root itself keeps its mode
    parent_rel, name = posixpath.split(rel)
    parent = resolve_in_root(root, parent_rel, create=True)
    if not os.path.isdir(parent) or os.path.islink(parent):
        raise UnsafeLayer(f"entry {member.name!r}: its parent is not a directory")
    if name == OPAQUE:
        for child in os.listdir(parent):
            if posixpath.join(parent_rel, child) not in created:
                _remove(os.path.join(parent, child))
        return
    if name.startswith(WHITEOUT):
        target = name[len(WHITEOUT) :]
        if target in ("", ".", ".."):
            raise UnsafeLayer(f"entry {member.name!r} is a malformed whiteout")
        _remove(os.path.join(parent, target))
        return
    dest = os.path.join(parent, name)
    created.add(rel)
    mode = member.mode & 0o7777
    if member.isdir():
        if os.path.isdir(dest) and not os.path.islink(dest):
            pass
        else:
            _remove(dest)
            os.mkdir(dest, 0o700)
        if not keep_owner:
            mode |= 0o700
        dir_modes.append((dest, mode, float(member.mtime)))
        if keep_owner:
            os.lchown(dest, member.uid, member.gid)
        return
    if not (member.isreg() or member.issym() or member.islnk() or member.isfifo()):
        return  # character and block devices: not needed, bubblewrap provides /dev
    _remove(dest)
    if member.isreg():
        source = tar.extractfile(member)
        assert source is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(dest, flags, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, _COPY)
    elif member.issym():
        os.symlink(member.linkname, dest)
    elif member.islnk():
        link_rel = _member_path(member.linkname)
        target = resolve_in_root(root, link_rel, follow_last=False)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise UnsafeLayer(
                f"entry {member.name!r}: hard link to missing {member.linkname!r}"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeLayer(f"entry {member.name!r}: hard link to a non-file {member.linkname!r}")
        os.link(target, dest, follow_symlinks=False)
        return  # shares the target's inode: mode and owner are the target's
    else:
        os.mkfifo(dest, 0o600)
    if keep_owner:
        os.lchown(dest, member.uid, member.gid)
    if not member.issym():
        os.chmod(dest, mode)
    with contextlib.suppress(OSError):
        os.utime(dest, (member.mtime, member.mtime), follow_symlinks=False)

"""Applies image layers (tar archives, optionally gzip-compressed) onto one root directory.

Layers come from registries and must be treated as hostile. Nothing here follows a symlink or
resolves a path outside the root, at any step (`beneath.py`): every entry's parent directory is
walked from the root's descriptor one component at a time, symlinks of this or earlier layers
being followed *inside* the root as the sandbox would see them; the entry is then made relative
to that directory's descriptor, and its mode, owner and times are set on a descriptor opened
with O_NOFOLLOW (or with the no-follow variants of the *at calls). Directory modes and times are
applied after the layer (a 0555 directory must stay writable while it fills) by walking again
from the root without following anything: a directory that a later entry replaced by a symlink
is skipped, never chmodded through. Entries whose own name is absolute or climbs with `..` are
refused outright (`UnsafeLayer`): a well-formed layer never has them.

Whiteouts (OCI image spec, "Representing changes"): `.wh.NAME` removes NAME of earlier layers,
`.wh..wh..opq` empties its directory of what earlier layers put there. Entries of the layer being
applied are kept.

What is not reproduced: device nodes (skipped; a sandbox gets bubblewrap's /dev), extended
attributes and file capabilities (skipped), setuid and setgid bits (stripped: the store is on
the host's disk; sandboxes run with no_new_privs, where they would be inert anyway), sparse
files (refused: no common image builder writes them), ownership when not running as root (files
belong to the service's user, which a rootless sandbox's user namespace maps to its uid), and
permission bits that would stop the service's own user from writing its unpack directory (owner
rwx is added to directories when not root). The root is bound read-only into sandboxes.

Bounded: every uncompressed byte and every entry is charged to the pull's `PullBudget`; tar
headers that tarfile would read into memory whole (PAX and GNU long-name records) are refused
above `MAX_HEADER_BYTES`, names above PATH_MAX.

Why not `tarfile`'s extraction filters: the `data` filter refuses absolute symlinks, which real
images are full of (`/etc/alternatives`), and knows nothing of whiteouts or of resolving through
symlinks of earlier layers; so members are read with `tarfile` and written by this module.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aviato.images import beneath
from aviato.images.beneath import At, UnsafeLayer
from aviato.images.errors import ImageError
from aviato.images.limits import PullBudget, PullLimits

__all__ = ["UnsafeLayer", "apply_layer"]

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_NAME_BYTES = 4096  # PATH_MAX: a longer path could not be used inside a sandbox anyway
MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_CHAIN = 8  # header records before one member (PAX, long name, long link: 3 in use)
_SETID = stat.S_ISUID | stat.S_ISGID
_COPY = 1 << 20
_OPEN_ANY = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class _HashingReader:
    """A file-like object that hashes what is read through it (the layer's diff id) and charges
    it to the pull's budget."""

    def __init__(self, raw: IO[bytes], budget: PullBudget) -> None:
        self._raw = raw
        self._budget = budget
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size if 0 <= size <= _COPY else _COPY)
        self._budget.unpack(len(data))
        self.hasher.update(data)
        return data

    def drain(self) -> None:
        while self.read(_COPY):
            pass


_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                 tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)  # fmt: skip


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses, before tarfile reads them into memory whole, header records (PAX, GNU long
    names) larger than MAX_HEADER_BYTES; chains of more than MAX_HEADER_CHAIN header records
    (tarfile recurses once per record); global PAX headers adding up to more than
    MAX_HEADER_BYTES (tarfile keeps them for the whole layer); and sparse members, whose maps
    tarfile would also hold in memory and whose holes would be written out as zeros. (These
    hook tarfile's member processing, which has had these names since Python 3.0.)"""

    def _proc_member(self, tf: tarfile.TarFile) -> Any:
        if self.type in _HEADER_TYPES:
            if self.size > MAX_HEADER_BYTES:
                raise UnsafeLayer(
                    f"a tar header record of {self.size} bytes (at most {MAX_HEADER_BYTES})"
                )
            chain = getattr(tf, "_aviato_header_chain", 0) + 1
            if chain > MAX_HEADER_CHAIN:
                raise UnsafeLayer(f"more than {MAX_HEADER_CHAIN} tar header records in a row")
            setattr(tf, "_aviato_header_chain", chain)  # noqa: B010 (not a TarFile attribute)
            if self.type == tarfile.XGLTYPE:
                kept = sum(len(k) + len(v) for k, v in tf.pax_headers.items())
                if kept + self.size > MAX_HEADER_BYTES:
                    raise UnsafeLayer(f"global tar headers of more than {MAX_HEADER_BYTES} bytes")
        else:
            setattr(tf, "_aviato_header_chain", 0)  # noqa: B010
        if self.type == tarfile.GNUTYPE_SPARSE:
            _sparse(self.name)
        return super()._proc_member(tf)  # type: ignore[misc]

    def _proc_gnusparse_00(self, next: tarfile.TarInfo, *_: Any) -> None:
        _sparse(next.name)

    def _proc_gnusparse_01(self, next: tarfile.TarInfo, *_: Any) -> None:
        _sparse(next.name)

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, *_: Any) -> None:
        _sparse(next.name)


def _sparse(name: str) -> None:
    raise UnsafeLayer(f"entry {name!r} is a sparse file, which aviato does not unpack")


@contextlib.contextmanager
def _open_layer(blob: Path, budget: PullBudget) -> Iterator[_HashingReader]:
    with open(blob, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                yield _HashingReader(gz, budget)  # type: ignore[arg-type]
        elif magic == b"\x28\xb5\x2f\xfd":
            raise ImageError(f"layer {blob.name} is zstd-compressed, which is not supported yet")
        else:
            yield _HashingReader(f, budget)


@dataclass
class _Layer:
    """The state of one layer being applied."""

    root_fd: int
    keep_owner: bool
    budget: PullBudget
    whiteouts: bool = True
    created: set[str] = field(default_factory=set)  # real paths this layer made
    dir_modes: list[tuple[tuple[str, ...], int, float]] = field(default_factory=list)
    parent: At | None = None  # the last parent directory, kept while entries stay in it
    parent_rel: str | None = None

    def parent_of(self, rel: str) -> At:
        if self.parent is not None and self.parent_rel == rel:
            return self.parent
        self.forget_parent()
        self.parent = beneath.walk(self.root_fd, rel, create=True)
        self.parent_rel = rel
        return self.parent

    def forget_parent(self) -> None:
        if self.parent is not None:
            self.parent.close()
        self.parent, self.parent_rel = None, None


def apply_layer(
    blob: Path,
    root: Path,
    *,
    keep_owner: bool | None = None,
    budget: PullBudget | None = None,
    whiteouts: bool = True,
) -> str:
    """Applies the layer in `blob` onto `root`; returns the digest of its uncompressed tar.

    `keep_owner` (default: when running as root) applies the entries' uid/gid. `budget` is the
    pull's account (default: the default limits, for one layer). `whiteouts=False` makes
    `.wh.` names plain entries (a snapshot's tree, cluster/snapshot_archive.py, is no layer).
    """
    if keep_owner is None:
        keep_owner = os.geteuid() == 0
    if budget is None:
        budget = PullBudget(blob.name, PullLimits(), root)
    root_fd = beneath.open_root(root)
    state = _Layer(root_fd, keep_owner, budget, whiteouts)
    try:
        with _open_layer(blob, budget) as reader:
            try:
                with tarfile.open(  # type: ignore[call-overload]
                    fileobj=reader, mode="r|", tarinfo=_BoundedTarInfo
                ) as tar:
                    while (member := tar.next()) is not None:
                        tar.members.clear()  # tarfile keeps every member otherwise
                        budget.entry()
                        _apply_member(tar, member, state)
            except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile, ValueError) as exc:
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise budget.disk_full(exc) from exc
                raise UnsafeLayer(f"the layer cannot be read or applied: {exc}") from exc
            reader.drain()
            diff_id = "sha256:" + reader.hasher.hexdigest()
        state.forget_parent()
        _apply_dir_modes(state)
    finally:
        state.forget_parent()
        os.close(root_fd)
    return diff_id


def _apply_dir_modes(state: _Layer) -> None:
    """Modes and times of this layer's directories, deepest last-made first, each reached again
    from the root without following anything (a replaced directory is skipped)."""
    for parts, mode, mtime in reversed(state.dir_modes):
        at = beneath.reopen(state.root_fd, parts)
        if at is None:
            continue
        with at, contextlib.suppress(OSError):
            os.fchmod(at.fd, mode)
            os.utime(at.fd, (mtime, mtime))


def _member_path(name: str) -> str:
    """The normalized relative path of a member; UnsafeLayer for absolute or climbing names."""
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise UnsafeLayer(f"entry {name[:64]!r}...: a name longer than {MAX_NAME_BYTES} bytes")
    if "\0" in name:
        raise UnsafeLayer(f"entry {name!r} has a NUL in its name")
    if name.startswith("/"):
        raise UnsafeLayer(f"entry {name!r} has an absolute path")
    if ".." in name.split("/"):
        raise UnsafeLayer(f"entry {name!r} climbs out of the layer with '..'")
    normalized = posixpath.normpath(name)
    return "" if normalized == "." else normalized


def _apply_member(tar: tarfile.TarFile, member: tarfile.TarInfo, state: _Layer) -> None:
    rel = _member_path(member.name)
    if not rel:
        return  # "./": the root itself keeps its mode
    parent_rel, name = posixpath.split(rel)
    parent = state.parent_of(parent_rel)
    real = "/".join((*parent.parts, name))
    if state.whiteouts and name == OPAQUE:
        for child in os.listdir(parent.fd):
            if "/".join((*parent.parts, child)) not in state.created:
                beneath.remove(parent.fd, child)
        state.forget_parent()
        return
    if state.whiteouts and name.startswith(WHITEOUT):
        target = name[len(WHITEOUT) :]
        if target in ("", ".", ".."):
            raise UnsafeLayer(f"entry {member.name!r} is a malformed whiteout")
        beneath.remove(parent.fd, target)
        state.forget_parent()
        return
    state.created.add(real)
    mode = member.mode & 0o7777 & ~_SETID
    if member.isdir():
        if _make_dir(member, parent, name, mode, state):
            state.forget_parent()
        return
    if not (member.isreg() or member.issym() or member.islnk() or member.isfifo()):
        return  # character and block devices: not needed, bubblewrap provides /dev
    if _is_dir_or_link(parent.fd, name) or member.issym():
        # Paths through `name` resolve differently from now on: the next entry walks again.
        # (The cached directory itself stays valid: it is a descriptor inside the root.)
        state.forget_parent()
        parent = state.parent_of(parent_rel)
    beneath.remove(parent.fd, name)
    if member.isreg():
        _write_file(tar, member, parent, name, mode, state)
    elif member.issym():
        _make_symlink(member, parent, name, state)
    elif member.islnk():
        _make_hard_link(member, parent, name, state)
    else:
        os.mkfifo(name, 0o600, dir_fd=parent.fd)
        fd = os.open(name, _OPEN_ANY, dir_fd=parent.fd)
        try:
            _finish_fd(fd, member, mode, state)
        finally:
            os.close(fd)


def _is_dir_or_link(dir_fd: int, name: str) -> bool:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)


def _finish_fd(fd: int, member: tarfile.TarInfo, mode: int, state: _Layer) -> None:
    """Owner, mode and times of an entry we made, on our own descriptor of it."""
    if state.keep_owner:
        os.fchown(fd, member.uid, member.gid)
    os.fchmod(fd, mode)
    with contextlib.suppress(OSError):
        os.utime(fd, (member.mtime, member.mtime))


def _make_dir(member: tarfile.TarInfo, parent: At, name: str, mode: int, state: _Layer) -> bool:
    """Makes (or keeps) the directory; True when it replaced something else."""
    replaced = False
    try:
        fd = os.open(name, beneath.DIR_FLAGS, dir_fd=parent.fd)
    except OSError:  # missing, or something else than a directory: replaced
        beneath.remove(parent.fd, name)
        os.mkdir(name, 0o700, dir_fd=parent.fd)
        fd = os.open(name, beneath.DIR_FLAGS, dir_fd=parent.fd)
        replaced = True
    try:
        if state.keep_owner:
            os.fchown(fd, member.uid, member.gid)
    finally:
        os.close(fd)
    if not state.keep_owner:
        mode |= 0o700
    state.dir_modes.append(((*parent.parts, name), mode, float(member.mtime)))
    return replaced


def _write_file(
    tar: tarfile.TarFile, member: tarfile.TarInfo, parent: At, name: str, mode: int,
    state: _Layer,
) -> None:  # fmt: skip
    source = tar.extractfile(member)
    assert source is not None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=parent.fd)
    try:
        while chunk := source.read(_COPY):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        _finish_fd(fd, member, mode, state)
    finally:
        os.close(fd)


def _make_symlink(member: tarfile.TarInfo, parent: At, name: str, state: _Layer) -> None:
    if len(member.linkname.encode("utf-8", "surrogateescape")) >= MAX_NAME_BYTES:
        raise UnsafeLayer(f"entry {member.name!r}: a link target longer than PATH_MAX")
    os.symlink(member.linkname, name, dir_fd=parent.fd)
    if state.keep_owner:
        os.chown(name, member.uid, member.gid, dir_fd=parent.fd, follow_symlinks=False)
    with contextlib.suppress(OSError):
        os.utime(name, (member.mtime, member.mtime), dir_fd=parent.fd, follow_symlinks=False)


def _make_hard_link(member: tarfile.TarInfo, parent: At, name: str, state: _Layer) -> None:
    target_rel = _member_path(member.linkname)
    try:
        at, target = beneath.locate(state.root_fd, target_rel, follow_last=False)
    except (FileNotFoundError, UnsafeLayer):
        raise UnsafeLayer(
            f"entry {member.name!r}: hard link to missing {member.linkname!r}"
        ) from None
    with at:
        try:
            st = os.stat(target, dir_fd=at.fd, follow_symlinks=False) if target else None
        except FileNotFoundError:
            st = None
        if st is None:
            raise UnsafeLayer(f"entry {member.name!r}: hard link to missing {member.linkname!r}")
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeLayer(f"entry {member.name!r}: hard link to a non-file {member.linkname!r}")
        # linkat without AT_SYMLINK_FOLLOW: links the entry itself, never what it points to.
        # It shares the target's inode: mode and owner are the target's (set-id already gone).
        os.link(target, name, src_dir_fd=at.fd, dst_dir_fd=parent.fd, follow_symlinks=False)

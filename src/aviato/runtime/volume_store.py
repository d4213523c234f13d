"""`VolumeStore`: the files of the named volumes that live on one machine (docs/volumes.md).

The control plane decides what a volume is (owner, name, size, home node) and keeps its record;
this module is what exists of it on the machine that holds its files, under that machine's
state directory S (the local service's, or a Ray node host's). A volume is named here by its
owner's key (a digest of the owner's name, never a path) and its name (checked: never '/',
'.' or '..'), and is one of two kinds:

- **sized** (`size_bytes` > 0, every volume made since sizes are enforced): an ext4 filesystem
  in a sparse image file `S/volume-images/<key>/<name>.img` of exactly that size, on a loop
  device, mounted (nosuid, nodev, discard) at `S/volume-mounts/<key>/<name>/` from its first
  use until it is deleted. The size is a hard bound: a write past it is ENOSPC in the sandbox,
  and the host's disk holds at most that many bytes for it (the image cannot grow; discard
  gives freed blocks back). `S/volume-mounts` is a private bind mount of itself while a volume
  is mounted beneath it, which each sandbox's launcher detaches from its own mount namespace
  (`--detach`), so that a sandbox pins only the volumes it mounts. When the service stops
  (`close`), it unmounts the volumes no live sandbox mounts, and the root's bind when none is
  left; a delete that unmounts the last volume undoes the bind too (a later use mounts both
  again). Formatting: mke2fs with lazy inode tables and a journal
  (a volume outlives host crashes): 17 ms for 10 GiB here, which then holds 4.3 MiB of the
  host's disk (mounted `noinit_itable`: the kernel does not zero the inode tables, which would
  allocate 160 MiB of a 10 GiB image).
- **directory** (`size_bytes` 0: volumes made before sizes were enforced, and every volume of
  a service that cannot loop-mount, i.e. not root): the directory `S/volumes/<key>/<name>/`,
  bound as it is; its size is measured, not enforced.

A volume that exists as a directory stays one (an old volume keeps its files and is still
mounted, whatever size is asked now).

Deleting renames the files into `S/volumes-deleted/` at once (so a create that follows gets a
fresh volume) and removes them in a thread; `clear_trash` removes what a stopped service left.
Blocking: call from a thread (the local service and the node host do).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Protocol

from aviato._private import private_dir
from aviato.runtime.base import LimitsUnavailable, SandboxRuntimeError
from aviato.runtime.mount_tools import (
    is_mount_point,
    mounts_beneath,
    run_tool,
    unbind_when_empty,
)

__all__ = [
    "MIN_VOLUME_BYTES",
    "VOLUME_MOUNTS",
    "VolumeHost",
    "VolumeStore",
    "VolumeStoreError",
    "disk_usage",
]

VOLUME_MOUNTS = "volume-mounts"
# The smallest sized volume: ext4 with a journal needs a few hundred KiB of its own.
MIN_VOLUME_BYTES = 1 << 20
_KEY = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TIMEOUT_S = 60.0
_MNT_DETACH = 2
_MS_BIND, _MS_PRIVATE = 4096, 1 << 18
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class VolumeHost(Protocol):
    """Another machine's volumes, as the control plane reaches them (cluster/node_volumes.py)."""

    async def usage(self, key: str, name: str) -> int:
        """What the volume takes of that machine's disk."""
        ...

    async def delete(self, key: str, name: str) -> None:
        """Removes the volume's files there (nothing when it has none)."""
        ...


class VolumeStoreError(SandboxRuntimeError):
    """A volume's files could not be made, mounted or removed on this machine."""


def _check(key: str, name: str) -> None:
    if not _KEY.fullmatch(key) or not _NAME.fullmatch(name):
        raise VolumeStoreError(f"not a volume: {key!r}/{name!r}")


def _run(argv: list[str], what: str) -> None:
    run_tool(argv, what, VolumeStoreError, _TIMEOUT_S)


def disk_usage(root: Path) -> int:
    """Bytes allocated to the files below `root` (st_blocks), following no symlink and not
    crossing into other filesystems. Hard links count once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    try:
        top = os.lstat(root)
    except OSError:
        return 0
    stack = [str(root)]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != top.st_dev:
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    return total


class VolumeStore:
    """The volumes whose files live under `state_dir` (see the module's docstring)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir = Path(state_dir)
        self._directories = state_dir / "volumes"
        self._images = state_dir / "volume-images"
        self.mounts_root = state_dir / VOLUME_MOUNTS
        self._trash = state_dir / "volumes-deleted"
        self._lock = threading.Lock()
        self._mkfs = shutil.which("mke2fs", path="/usr/sbin:/sbin:/usr/bin:/bin")
        self.sized_error = ""
        if os.geteuid() != 0:
            self.sized_error = "it needs the service to run as root (a loop-mounted filesystem)"
        elif self._mkfs is None:
            self.sized_error = "mke2fs (e2fsprogs) is not installed"

    # --- where ---

    def directory(self, key: str, name: str) -> Path:
        """Where a directory volume's files are."""
        return self._directories / key / name

    def _image(self, key: str, name: str) -> Path:
        return self._images / key / f"{name}.img"

    def _mount(self, key: str, name: str) -> Path:
        return self.mounts_root / key / name

    def kind(self, key: str, name: str) -> str:
        """ "directory", "sized" or "" (nothing of it here)."""
        _check(key, name)
        if self.directory(key, name).is_dir():
            return "directory"
        return "sized" if self._image(key, name).exists() else ""

    # --- ensure ---

    def ensure(self, key: str, name: str, size_bytes: int) -> str:
        """The host directory to bind for the volume, made on first use: a sized volume of
        `size_bytes` (mounted now if it is not), or a directory volume when `size_bytes` is 0
        or the volume exists as a directory already."""
        _check(key, name)
        with self._lock:
            directory = self.directory(key, name)
            if directory.is_dir() or (size_bytes <= 0 and not self._image(key, name).exists()):
                private_dir(directory.parent)
                # The volume's own directory is the sandbox root's (0755; id-mapped by the
                # launcher for a root service): private_dir would make it 0700.
                directory.mkdir(mode=0o755, exist_ok=True)
                return str(directory)
            return str(self._ensure_sized(key, name, size_bytes))

    def _ensure_sized(self, key: str, name: str, size_bytes: int) -> Path:
        mount, image = self._mount(key, name), self._image(key, name)
        if is_mount_point(mount):
            return mount
        if self.sized_error:
            raise LimitsUnavailable(f"this node cannot make sized volumes: {self.sized_error}")
        self._bind_root()
        private_dir(mount.parent)
        mount.mkdir(mode=0o755, exist_ok=True)
        made = False
        if not image.exists():
            if size_bytes < MIN_VOLUME_BYTES:
                raise VolumeStoreError(f"volume {name!r}: {size_bytes} bytes is too small")
            private_dir(image.parent)
            tmp = image.with_name(f".{image.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size_bytes)
            finally:
                os.close(fd)
            assert self._mkfs is not None
            try:
                _run([self._mkfs, "-q", "-F", "-t", "ext4", "-m", "0",
                      "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                      "-L", "aviato-volume", str(tmp)],
                     f"volume {name!r}: formatting its filesystem")  # fmt: skip
                os.rename(tmp, image)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            made = True
        _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,discard,noatime,noinit_itable",
              str(image), str(mount)], f"volume {name!r}: mounting its filesystem")  # fmt: skip
        if made:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(mount / "lost+found")
            os.chmod(mount, 0o755)
        return mount

    def _bind_root(self) -> None:
        """Makes `volume-mounts` a private bind mount of itself (unless it is one: a restarted
        service finds it bound while volumes are mounted), so that a launcher can detach every
        volume filesystem at once. Under `_lock`, as is its undoing: a volume is mounted beneath
        the root only while it is bound, so a launcher that finds the root unbound has no volume
        to detach."""
        private_dir(self.mounts_root)
        if is_mount_point(self.mounts_root):
            return
        root = str(self.mounts_root).encode()
        if (
            _libc.mount(root, root, None, ctypes.c_ulong(_MS_BIND), None) != 0
            or _libc.mount(b"none", root, None, ctypes.c_ulong(_MS_PRIVATE), None) != 0
        ):
            err = ctypes.get_errno()
            raise VolumeStoreError(f"cannot prepare {self.mounts_root}: {os.strerror(err)}")

    # --- measure ---

    def usage(self, key: str, name: str) -> int:
        """What the volume takes of this machine's disk: a sized one its image's allocated
        blocks (at most its size), a directory one its files' (a walk of them)."""
        _check(key, name)
        image = self._image(key, name)
        try:
            return os.stat(image).st_blocks * 512
        except FileNotFoundError:
            return disk_usage(self.directory(key, name))

    # --- delete ---

    def delete(self, key: str, name: str) -> None:
        """Removes the volume's files (nothing when it has none here): unmounted and renamed
        aside at once, deleted in a thread."""
        _check(key, name)
        with self._lock:
            private_dir(self._trash)
            stamp = f"{key}-{name}-{time.time_ns()}"
            mount = self._mount(key, name)
            if is_mount_point(mount) and _libc.umount2(str(mount).encode(), _MNT_DETACH) != 0:
                err = ctypes.get_errno()
                raise VolumeStoreError(f"volume {name!r}: unmounting: {os.strerror(err)}")
            with contextlib.suppress(OSError):
                mount.rmdir()
            unbind_when_empty(self.mounts_root)  # when that was the last volume mounted
            doomed: list[Path] = []
            for source, suffix in (
                (self._image(key, name), ".img"),
                (self.directory(key, name), ""),
            ):
                target = self._trash / (stamp + suffix)
                try:
                    os.rename(source, target)
                except FileNotFoundError:
                    continue
                doomed.append(target)
        for path in doomed:
            threading.Thread(target=_remove, args=(path,), daemon=True).start()

    def close(self, in_use: Collection[tuple[str, str]]) -> None:
        """At the service's stop: unmounts the sized volumes that no live sandbox mounts
        (`in_use`: their (key, name)), then the root's bind when no volume is left beneath it.
        A volume a sandbox mounts stays mounted (the sandbox may outlive the service, and a
        new service finds it so); the others are mounted again at their next use."""
        with self._lock:
            for point in mounts_beneath(self.mounts_root):
                parts = Path(point).relative_to(self.mounts_root).parts
                if len(parts) != 2 or (parts[0], parts[1]) in in_use:
                    continue
                if _libc.umount2(point.encode(), _MNT_DETACH) == 0:
                    with contextlib.suppress(OSError):
                        os.rmdir(point)
            unbind_when_empty(self.mounts_root)

    def unmount_all(self) -> None:
        """Unmounts every sized volume and the mounts root (for tools that remove a state
        directory: the files stay in their images)."""
        below = str(self.mounts_root)
        try:
            with open("/proc/self/mountinfo", "rb") as f:
                points = [line.split()[4].decode() for line in f]
        except OSError:
            return
        for point in sorted(
            (p for p in points if p == below or p.startswith(below + "/")), key=len, reverse=True
        ):
            _libc.umount2(point.encode(), _MNT_DETACH)

    def clear_trash(self) -> None:
        """Removes what deletes left behind (a service stopped during one), and images whose
        formatting a stopped service left unfinished (`.<name>.img.<pid>.tmp`)."""
        shutil.rmtree(self._trash, ignore_errors=True)
        with contextlib.suppress(OSError):
            for owner in os.scandir(self._images):
                with contextlib.suppress(OSError):
                    for entry in os.scandir(owner.path):
                        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                            os.unlink(entry.path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

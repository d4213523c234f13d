"""Writable layers that live outside bubblewrap: a filesystem of the sandbox's own, mounted by
the runtime under `<state>/layers/<sandbox id>/` and shown to the sandbox id-mapped.

A sandbox's writable layer is one of:

- **memory, plain** (the default): bubblewrap's `--size N --tmpfs /`; nothing here.
- **disk**: an ext4 filesystem in a sparse image file `<state>/layers/<id>.img` of exactly the
  sandbox's disk size, on a loop device, mounted at `<state>/layers/<id>/` (nosuid, nodev,
  discard: space a sandbox frees goes back to the host). The size is a hard limit: a write past
  it fails with ENOSPC inside the sandbox, and the host's disk holds at most that much for it.
  The image is made at create (mke2fs with lazy inode tables and no journal: about 5 ms here,
  the loop mount about 10 ms more; see docs/state.md). No journal: a host crash may
  lose the layer's last writes, which a layer that dies with its sandbox can afford.
- **memory, from a snapshot**: a tmpfs of the disk size mounted at the same place (its pages are
  charged to the memory cgroup of whoever writes them: the sandbox).

Inside the mount: `upper/` (the layer's files, stored with the sandbox's own uids 0..65536, as
the snapshots store them) and `work/` (overlayfs's work directory, when the layer is the upper
of an overlay whose lower is a snapshot). The launcher (native/privileges.c, `--layer`) shows
the mount to bwrap id-mapped and writable at `LAYER_AT`, in its own mount namespace, so that the
sandbox's root owns what uid 0 owns on it; and it detaches `<state>/layers` there (`--detach`),
so that a sandbox's mount namespace never pins another sandbox's layer.

The mounts live in the host's mount namespace: they survive a restart of the service (a new
service finds them by path) and are removed by `remove` when the sandbox is cleaned up.
`<state>/layers` is a bind mount only while a layer is mounted beneath it: made by the first
`make`, undone (`release_root`) when the last layer is removed and when the runtime closes
with none left, so that a stopped service whose state directory is deleted leaves nothing in
the host's mount table (each leftover mount slows every later bwrap start on the host).
Needs host root (mount, loop devices): a rootless service has no layers of this kind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from aviato._private import private_dir
from aviato.runtime.base import SandboxRuntimeError
from aviato.runtime.mount_tools import is_mount_point, run_tool, unbind_when_empty

__all__ = ["LAYER_AT", "LAYER_KINDS", "Layer", "LayerError", "WritableLayers"]

# Where a root service's launcher shows bwrap the sandbox's layer mount (in a mount namespace
# of the launcher's own; on the host it stays an empty directory).
LAYER_AT = "/run/aviato/layer"
LAYER_KINDS = ("memory", "disk")
_MOUNT_TIMEOUT_S = 30.0
_MNT_DETACH = 2
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_PRIVATE = 2, 4, 4096, 1 << 18
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class LayerError(SandboxRuntimeError):
    """A writable layer could not be made or removed (no loop device, mke2fs failed, ...)."""


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    rc = _libc.mount(
        source.encode(),
        target.encode(),
        None if fstype is None else fstype.encode(),
        ctypes.c_ulong(flags),
        None if data is None else data.encode(),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _run(argv: list[str], what: str) -> None:
    run_tool(argv, what, LayerError, _MOUNT_TIMEOUT_S)


@dataclass(frozen=True)
class Layer:
    """A sandbox's layer mount: `upper` holds its files, `work` is overlayfs's scratch."""

    sandbox_id: str
    mount: Path
    kind: str

    @property
    def upper(self) -> Path:
        return self.mount / "upper"

    @property
    def work(self) -> Path:
        return self.mount / "work"

    def staged(self, path: Path) -> str:
        """Where bwrap sees `path` (inside this layer's mount), through the launcher's stage."""
        return LAYER_AT + "/" + str(path.relative_to(self.mount))


class WritableLayers:
    """The layer mounts of one runtime, under `state_dir/layers/` (itself a private bind mount
    while a layer is mounted beneath it, so that a launcher can detach the whole subtree from
    its own mount namespace).

    The invariant that keeps a launcher's `--detach` complete: a layer is mounted beneath the
    root only while the root is bound. `make` binds the root and counts itself as making before
    it mounts, `release_root` unbinds only when nothing is mounted beneath and nothing is being
    made, both under one lock. A sandbox's mount namespace copies the host's at its start: with
    the root bound it detaches every layer there; without, there is no layer to detach. Another
    process mounting beneath the same root (two services on one state directory, which the
    service's pid file refuses) is not covered."""

    def __init__(self, state_dir: Path) -> None:
        self.root = private_dir(Path(state_dir) / "layers")
        self.error = ""
        self._mkfs = shutil.which("mke2fs", path="/usr/sbin:/sbin:/usr/bin:/bin")
        if self._mkfs is None:
            self.error = "mke2fs (e2fsprogs) is not installed"
        self._lock = threading.Lock()
        self._making = 0  # `make`s between binding the root and mounting their layer

    def _bind_root(self) -> None:
        """Makes the root a private bind mount of itself unless it is one (read afresh: a
        restarted service finds it bound while its sandboxes' layers are)."""
        if is_mount_point(self.root):
            return
        try:
            _mount(str(self.root), str(self.root), None, _MS_BIND, None)
            _mount("none", str(self.root), None, _MS_PRIVATE, None)
            os.makedirs(LAYER_AT, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise LayerError(
                f"cannot prepare {self.root} for layer mounts: {exc.strerror}"
            ) from exc

    def release_root(self) -> bool:
        """Undoes the root's bind mount (lazily; also a bind stacked twice by older versions)
        when no layer is mounted beneath it and none is being made. Whether the root is left
        unbound. Blocking: reads the mount table."""
        with self._lock:
            return not self._making and unbind_when_empty(self.root)

    def _paths(self, sandbox_id: str) -> tuple[Path, Path]:
        return self.root / sandbox_id, self.root / f"{sandbox_id}.img"

    def present(self, sandbox_id: str) -> Layer | None:
        """The sandbox's layer if it is mounted (after a restart too)."""
        mount, image = self._paths(sandbox_id)
        if not is_mount_point(mount):
            return None
        return Layer(sandbox_id, mount, "disk" if image.exists() else "memory")

    def make(self, sandbox_id: str, kind: str, size_bytes: int) -> Layer:
        """Makes and mounts the layer of `kind` ("disk" or "memory") of `size_bytes`, with
        empty `upper/` and `work/` owned by the sandbox's uid 0. Blocking (run it in a thread).
        """
        if self.error:
            raise LayerError(f"this node cannot make a {kind} layer: {self.error}")
        if kind not in LAYER_KINDS:
            raise LayerError(f"unknown writable layer {kind!r}")
        with self._lock:
            self._bind_root()
            self._making += 1
        try:
            return self._make(sandbox_id, kind, size_bytes)
        finally:
            with self._lock:
                self._making -= 1

    def _make(self, sandbox_id: str, kind: str, size_bytes: int) -> Layer:
        mount, image = self._paths(sandbox_id)
        mount.mkdir(mode=0o700)
        try:
            if kind == "disk":
                fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(fd, size_bytes)
                finally:
                    os.close(fd)
                assert self._mkfs is not None
                _run([self._mkfs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0",
                      "-E", "lazy_itable_init=1,nodiscard", "-L", "aviato-layer", str(image)],
                     f"sandbox {sandbox_id}: formatting its disk layer")  # fmt: skip
                _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,discard,noatime",
                      str(image), str(mount)],
                     f"sandbox {sandbox_id}: mounting its disk layer")  # fmt: skip
            else:
                _mount("tmpfs", str(mount), "tmpfs", _MS_NOSUID | _MS_NODEV,
                       f"size={size_bytes},mode=0755")  # fmt: skip
            for sub in ("upper", "work"):
                os.mkdir(mount / sub, 0o755)
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(mount / "lost+found")
        except BaseException:
            self._remove(sandbox_id)
            raise
        return Layer(sandbox_id, mount, kind)

    def remove(self, sandbox_id: str) -> None:
        """Unmounts and deletes the sandbox's layer (nothing when it has none), and the root's
        bind when it was the last layer. The loop device goes with the last mount
        (autoclear)."""
        if self._remove(sandbox_id):
            self.release_root()

    def _remove(self, sandbox_id: str) -> bool:
        mount, image = self._paths(sandbox_id)
        if not os.path.lexists(mount) and not os.path.lexists(image):
            return False  # a memory layer: nothing here (spares reading mountinfo then)
        if is_mount_point(mount):
            try:
                _umount(str(mount))
            except OSError as exc:
                raise LayerError(f"sandbox {sandbox_id}: {exc.strerror}") from exc
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)  # its blocks go once the loop device lets go (autoclear)
        try:
            os.rmdir(mount)
        except FileNotFoundError:
            pass
        except OSError as exc:  # still a mount point elsewhere a moment longer: harmless
            raise LayerError(f"sandbox {sandbox_id}: {mount} stays: {exc.strerror}") from exc
        return True

    def launcher_args(self, layer: Layer | None) -> list[str]:
        """The launcher's options: stage `layer` (when given), and always detach the others
        (the root, when it is bound as the launcher starts; the launcher ignores a root that is
        not a mount point, and then no layer is mounted beneath it)."""
        args = ["--detach", str(self.root)]
        if layer is not None:
            args += ["--layer", f"{layer.mount}:{LAYER_AT}"]
        return args

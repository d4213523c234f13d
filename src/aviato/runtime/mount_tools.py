"""Helpers of the runtime's loop-mounted filesystems (writable_layers.py, volume_store.py):
what is mounted where, undoing a root's bind mount once nothing is mounted beneath it, and
running mkfs or mount with its error in words."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import subprocess
from pathlib import Path

from aviato.runtime.base import SandboxRuntimeError

__all__ = ["is_mount_point", "mount_points", "mounts_beneath", "run_tool", "unbind_when_empty"]

_MNT_DETACH = 2
# More binds of one root stacked on each other than this are not ours to undo.
_MAX_STACKED_BINDS = 8
_OCTAL = re.compile(rb"\\([0-7]{3})")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount_points() -> list[str]:
    """The mount points of this mount namespace, as paths (mountinfo's escapes undone); empty
    when the table cannot be read."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            fields = [line.split() for line in f]
    except OSError:
        return []
    return [
        _OCTAL.sub(lambda m: bytes([int(m[1], 8)]), f[4]).decode(errors="surrogateescape")
        for f in fields
        if len(f) > 4
    ]


def mounts_beneath(path: Path, points: list[str] | None = None) -> list[str]:
    """The mount points strictly beneath `path` (of `points`, else of the mount table now)."""
    prefix = str(path).rstrip("/") + "/"
    return [p for p in (mount_points() if points is None else points) if p.startswith(prefix)]


def unbind_when_empty(root: Path) -> bool:
    """Lazily unmounts `root` (every bind of it stacked on another, up to a few) while nothing
    is mounted beneath it. Whether `root` is no mount point now. The caller makes sure that
    nothing is mounted beneath it meanwhile."""
    for _ in range(_MAX_STACKED_BINDS):
        points = mount_points()
        if str(root) not in points:
            return True
        if mounts_beneath(root, points):
            return False
        if _libc.umount2(str(root).encode(), _MNT_DETACH) != 0:
            return False
    return str(root) not in mount_points()


def is_mount_point(path: Path) -> bool:
    """Whether `path` is a mount point of this mount namespace (also a bind mount of a
    directory onto itself, which `os.path.ismount` cannot see)."""
    want = str(path).encode().replace(b"\\", b"\\134").replace(b" ", b"\\040")
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            return any(line.split()[4] == want for line in f)
    except (OSError, IndexError):
        return False


def run_tool(argv: list[str], what: str, error: type[SandboxRuntimeError], timeout: float) -> None:
    """Runs `argv` to its end (at most `timeout` seconds); raises `error` with `what` and the
    tool's own message when it cannot run or fails."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise error(f"{what}: {exc}") from exc
    if out.returncode != 0:
        raise error(f"{what}: {(out.stderr or out.stdout).strip()}")

"""Two helpers of the runtime's loop-mounted filesystems (writable_layers.py, volume_store.py):
whether a path is a mount point, and running mkfs or mount with its error in words."""

from __future__ import annotations

import subprocess
from pathlib import Path

from aviato.runtime.base import SandboxRuntimeError

__all__ = ["is_mount_point", "run_tool"]


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

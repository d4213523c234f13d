"""Re-attach records: `runtime.json` in a sandbox's state directory says which host process is
its bwrap (pid, start time, boot id), which cgroup, image and uid range it has, so that a
service started later finds its sandboxes again (`BubblewrapRuntime.attach`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from aviato.runtime.bubblewrap.host_processes import is_zombie, proc_stat
from aviato.runtime.cgroups import SandboxCgroup
from aviato.runtime.userns import IdRange


def sandbox_running(directory: Path) -> bool | None:
    """Whether the sandbox with state `directory` (of any service of this host) still runs: its
    bwrap (pid and start time from runtime.json) is alive. None while it has no record."""
    try:
        record = json.loads((directory / "runtime.json").read_text())
        pid, starttime = int(record["pid"]), int(record["starttime"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    stat = proc_stat(pid)
    return stat is not None and stat[1] == starttime


def write_aside(
    directory: Path,
    pid: int,
    boot_id: str,
    cgroup: SandboxCgroup | None,
    ids: IdRange | None,
    image_digest: str | None,
) -> asyncio.Future[None]:
    """`write_record` in a thread, while the supervisor starts: it reads the launcher's
    /proc/<pid>/stat, which waits while the launcher execs (0.8 ms here, up to 2), and the
    event loop must not wait with it. The caller settles it (`settled`) before it goes on, so
    that no abort removes the directory under it, and then raises its error."""
    return asyncio.ensure_future(
        asyncio.to_thread(write_record, directory, pid, boot_id, cgroup, ids, image_digest)
    )


async def settled(task: asyncio.Future[None]) -> None:
    """Waits for `task` to end, its error (if any) taken: the failure being raised is another."""
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()


def write_record(
    directory: Path,
    pid: int,
    boot_id: str,
    cgroup: SandboxCgroup | None,
    ids: IdRange | None,
    image_digest: str | None,
) -> None:
    """Writes the sandbox's runtime.json once, right after its launcher started as `pid`."""
    stat = proc_stat(pid)
    record: dict[str, Any] = {
        "pid": pid,
        "starttime": stat[1] if stat else 0,
        "boot_id": boot_id,
        "cgroup": None if cgroup is None else {"version": cgroup.version, "dirs": cgroup.dirs},
    }
    if image_digest is not None:
        record["image_digest"] = image_digest
    if ids is not None:
        record["uid_slot"] = ids.slot
    # One small write into a new file: no temporary + rename (a journal commit on ext4,
    # up to a millisecond on the create path). A reader that finds it torn treats the
    # sandbox as lost, which is what a crash at that instant means anyway.
    data = json.dumps(record).encode()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = os.open(directory / "runtime.json", flags, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_record(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / "runtime.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def open_process(record: dict[str, Any] | None, boot_id: str) -> tuple[int, int, bool] | None:
    """(pid, pidfd, is_child) of the sandbox's bwrap if it still runs, else None."""
    if not record or record.get("boot_id") != boot_id:
        return None
    pid = int(record.get("pid", 0))
    if pid <= 0:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    stat = proc_stat(pid)  # checked after pidfd_open: the fd is then the right process
    if stat is None or stat[1] != record.get("starttime") or is_zombie(pid):
        os.close(pidfd)
        if stat is not None and stat[0] == os.getpid():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # our own child that ended: reaped
        return None
    return pid, pidfd, stat[0] == os.getpid()

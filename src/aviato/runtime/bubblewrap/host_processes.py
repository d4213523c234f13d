"""Host processes of a sandbox as the service sees them: watching its bwrap through a pidfd,
killing everything of it, reading /proc, and the service's own descriptor limit."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
from pathlib import Path

from aviato.runtime.base import SandboxGone
from aviato.runtime.cgroups import SandboxCgroup


def raise_fd_limit() -> int:
    """Raises this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit.

    Every live sandbox holds descriptors in the service (its bwrap's pidfd, the supervisor
    connection) and a create briefly needs a handful more, so the common soft default of 1024
    runs out near 500 sandboxes. Raising the soft limit up to the hard one needs no privilege.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def out_of_descriptors(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is EMFILE or ENFILE."""
    for _ in range(5):
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            return True
        exc = exc.__cause__
    return False


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def is_zombie(pid: int) -> bool:
    """Whether `pid` has exited and waits to be reaped (by its parent, or by init once the
    zygote or service that started it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :].startswith(b"Z")


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, starttime in clock ticks) of a live or zombie process, or None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    # fields[0] is the state (field 3 of stat), so field N is fields[N - 3].
    try:
        return int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def read_tail(path: Path, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


class ProcessWatch:
    """Resolves `done` when a host process exits, via a pidfd in the event loop.

    Reaps the process when it is our child (no zombies); a process that is not our child (after
    a service restart) is reaped by whoever inherited it. `detach` stops watching without
    resolving (the service is closing and the sandbox keeps running).
    """

    def __init__(self, pid: int, pidfd: int | None, is_child: bool) -> None:
        """`pidfd` None: the process is already gone (`done` is resolved at once)."""
        self.pid = pid
        self.is_child = is_child
        self._fd = pidfd
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        if pidfd is None:
            self.done.set_result(None)
        else:
            self._loop.add_reader(pidfd, self._ready)

    def _ready(self) -> None:
        if self.is_child:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)
        self._close()
        if not self.done.done():
            self.done.set_result(None)

    def _close(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def send(self, signo: int) -> None:
        if self._fd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._fd, signo)

    def detach(self) -> None:
        """Stops watching; whoever still waits on `done` gets SandboxGone."""
        self._close()
        if not self.done.done():
            self.done.set_exception(SandboxGone("the runtime was closed"))
            self.done.exception()  # retrieved: no warning when nobody waits


async def kill_sandbox(watch: ProcessWatch, cgroup: SandboxCgroup | None) -> None:
    """SIGKILLs everything of a sandbox and waits (briefly) until its bwrap has exited.

    Everything but bwrap goes first, so that bwrap reaps the sandbox's init and exits by itself;
    bwrap is SIGKILLed only if it lingers. Without a cgroup, killing the init (bwrap's child)
    takes the whole pid namespace down with it.
    """
    if watch.done.done():
        if cgroup is not None:
            await cgroup.kill_all()
        return
    if cgroup is None or not await cgroup.kill_all(spare=(watch.pid,)):
        for child in children(watch.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
    try:
        await asyncio.wait_for(asyncio.shield(watch.done), 2.0)
    except TimeoutError:
        watch.send(signal.SIGKILL)
        if cgroup is not None:
            await cgroup.kill_all()

"""`SandboxCgroup`: the cgroups of one sandbox (its directory in each hierarchy): limits, OOM
and memory accounting, pausing (the freezer), killing everything in it, removing it."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections.abc import Collection, Iterable

from aviato.runtime.cgroups.cgroupfs import (
    CPU_PERIOD_US,
    CgroupError,
    read_file,
    read_key,
    write_file,
)
from aviato.runtime.cgroups.limits import Limits


class SandboxCgroup:
    """The cgroup directories of one sandbox. Cheap to build; touches nothing until used."""

    def __init__(self, version: int, dirs: dict[str, str]) -> None:
        """`dirs` maps controller name to directory (v2: every name maps to the same one)."""
        self.version = version
        self.dirs = dirs

    @property
    def unique_dirs(self) -> list[str]:
        return sorted(set(self.dirs.values()))

    @property
    def procs_files(self) -> list[str]:
        """Every `cgroup.procs` the sandbox's first process must join, one per hierarchy."""
        return [os.path.join(d, "cgroup.procs") for d in self.unique_dirs]

    @property
    def thread_files(self) -> list[str]:
        """v1 only: every `tasks` file, for joining with "0" (see `CgroupManager` docs)."""
        return [os.path.join(d, "tasks") for d in self.unique_dirs] if self.version == 1 else []

    def _dir(self, controller: str) -> str | None:
        return self.dirs.get(controller)

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.unique_dirs)

    def pids(self) -> list[int]:
        """Pids (host namespace) in the sandbox's cgroup; empty when it is gone."""
        directory = self._dir("pids") or self._dir("memory") or next(iter(self.dirs.values()))
        try:
            return [int(p) for p in read_file(os.path.join(directory, "cgroup.procs")).split()]
        except (OSError, ValueError):
            return []

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in this cgroup so far."""
        directory = self._dir("memory")
        if directory is None:
            return 0
        if self.version == 2:
            return read_key(os.path.join(directory, "memory.events"), "oom_kill")
        return read_key(os.path.join(directory, "memory.oom_control"), "oom_kill")

    def memory_headroom(self) -> int | None:
        """Bytes the sandbox can still charge before its memory limit, counting only what the
        kernel cannot reclaim (anonymous memory, tmpfs, kernel memory; not the file cache):
        the room left for its writable layer. None when unknown (no memory cgroup)."""
        directory = self._dir("memory")
        if directory is None:
            return None
        try:
            if self.version == 2:
                limit_text = read_file(os.path.join(directory, "memory.max")).strip()
                usage = int(read_file(os.path.join(directory, "memory.current")).strip())
                prefix = ""
            else:
                limit_text = read_file(os.path.join(directory, "memory.limit_in_bytes")).strip()
                usage = int(read_file(os.path.join(directory, "memory.usage_in_bytes")).strip())
                prefix = "total_"
            if limit_text == "max":
                return None
            limit = int(limit_text)
            stat = read_file(os.path.join(directory, "memory.stat"))
        except (OSError, ValueError):
            return None
        reclaimable = 0
        for line in stat.splitlines():
            name, _, value = line.partition(" ")
            if name in (prefix + "active_file", prefix + "inactive_file"):
                with contextlib.suppress(ValueError):
                    reclaimable += int(value)
        return limit - max(0, usage - reclaimable)

    def memory_peak(self) -> int:
        """Peak memory usage in bytes (0 when unknown)."""
        directory = self._dir("memory")
        if directory is None:
            return 0
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        with contextlib.suppress(OSError, ValueError):
            return int(read_file(os.path.join(directory, name)).strip())
        return 0

    def apply(self, limits: Limits) -> None:
        """Writes the limits. Raises CgroupError naming the file that refused."""
        writes: list[tuple[str, str]] = []
        mem = self._dir("memory")
        pids = self._dir("pids")
        cpu = self._dir("cpu")
        if self.version == 2:
            assert mem is not None
            writes += [
                (os.path.join(mem, "memory.max"), str(limits.memory_bytes)),
                (os.path.join(mem, "memory.swap.max"), "0"),
                (os.path.join(mem, "pids.max"), str(limits.pids)),
            ]
            if limits.cpu_millis is not None:
                quota = max(1000, limits.cpu_millis * CPU_PERIOD_US // 1000)
                writes.append((os.path.join(mem, "cpu.max"), f"{quota} {CPU_PERIOD_US}"))
        else:
            if mem is not None:
                writes.append(
                    (os.path.join(mem, "memory.limit_in_bytes"), str(limits.memory_bytes))
                )
                writes.append(
                    (os.path.join(mem, "memory.memsw.limit_in_bytes"), str(limits.memory_bytes))
                )
            if pids is not None:
                writes.append((os.path.join(pids, "pids.max"), str(limits.pids)))
            if cpu is not None and limits.cpu_millis is not None:
                quota = max(1000, limits.cpu_millis * CPU_PERIOD_US // 1000)
                writes.append((os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US)))
                writes.append((os.path.join(cpu, "cpu.cfs_quota_us"), str(quota)))
        for path, value in writes:
            try:
                write_file(path, value)
            except FileNotFoundError:
                # memory.swap.max / memsw files exist only with swap accounting: no swap to
                # escape into then.
                if not path.endswith(("memory.swap.max", "memory.memsw.limit_in_bytes")):
                    raise CgroupError(f"cannot set {path}: missing") from None
            except OSError as exc:
                raise CgroupError(f"cannot set {path} to {value}: {exc.strerror}") from exc

    def _signal_all(self, pids: Iterable[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _freeze_file(self) -> tuple[str, str, str] | None:
        """(file, freeze value, thaw value) of the freezer, None without one."""
        if self.version == 2:
            directory = next(iter(self.dirs.values()))
            return os.path.join(directory, "cgroup.freeze"), "1", "0"
        freezer = self._dir("freezer")
        if freezer is None:
            return None
        return os.path.join(freezer, "freezer.state"), "FROZEN", "THAWED"

    def _is_frozen(self) -> bool:
        if self.version == 2:
            directory = next(iter(self.dirs.values()))
            return read_key(os.path.join(directory, "cgroup.events"), "frozen") == 1
        freezer = self._dir("freezer")
        assert freezer is not None
        return read_file(os.path.join(freezer, "freezer.state")).strip() == "FROZEN"

    async def _freeze(self, max_wait: float = 1.0) -> bool:
        """Freezes the cgroup; True when the freezer exists (frozen or still freezing)."""
        freezer = self._freeze_file()
        if freezer is None:
            return False
        try:
            write_file(freezer[0], freezer[1])
        except OSError:
            return False
        deadline = time.monotonic() + max_wait
        while time.monotonic() < deadline:
            try:
                if self._is_frozen():
                    break
            except OSError:
                break
            await asyncio.sleep(0.001)
        return True

    def _thaw(self) -> None:
        freezer = self._freeze_file()
        if freezer is not None:
            with contextlib.suppress(OSError):
                write_file(freezer[0], freezer[2])

    # -- pausing: the freezer holds every process of the sandbox where it is -------------------

    @property
    def has_freezer(self) -> bool:
        """Whether the sandbox can be frozen (v2 always; v1 with the freezer hierarchy)."""
        return self.version == 2 or self._dir("freezer") is not None

    def frozen(self) -> bool:
        """Whether the freezer holds the sandbox now (v1: FROZEN or still FREEZING; the kernel
        keeps this across a restart of the service). False without a freezer or a cgroup."""
        if not self.has_freezer:
            return False
        try:
            if self.version == 2:
                directory = next(iter(self.dirs.values()))
                return read_file(os.path.join(directory, "cgroup.freeze")).strip() == "1"
            freezer = self._dir("freezer")
            assert freezer is not None
            return read_file(os.path.join(freezer, "freezer.state")).strip() != "THAWED"
        except OSError:
            return False

    async def freeze(self, max_wait: float = 5.0) -> None:
        """Freezes every process of the sandbox and waits until the kernel says all are.

        Raises CgroupError without a freezer, or when some process did not freeze within
        `max_wait` seconds (one in an uninterruptible wait, e.g. on a slow disk): the sandbox is
        thawed again then, never left half frozen."""
        freezer = self._freeze_file()
        if freezer is None:
            raise CgroupError("this sandbox has no cgroup freezer")
        try:
            write_file(freezer[0], freezer[1])
        except OSError as exc:
            raise CgroupError(f"cannot freeze ({freezer[0]}): {exc.strerror}") from exc
        deadline = time.monotonic() + max_wait
        delay = 0.001
        while True:
            try:
                if self._is_frozen():
                    return
            except OSError as exc:
                raise CgroupError(f"cannot read the freezer: {exc.strerror}") from exc
            if time.monotonic() > deadline:
                self._thaw()
                raise CgroupError(
                    f"not every process froze within {max_wait:g} s (one is in an "
                    "uninterruptible wait); the sandbox was left running"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def thaw(self) -> None:
        """Lets every process of the sandbox run again. Raises CgroupError when the kernel
        refuses (the cgroup is gone: the sandbox ended)."""
        freezer = self._freeze_file()
        if freezer is None:
            raise CgroupError("this sandbox has no cgroup freezer")
        try:
            write_file(freezer[0], freezer[2])
        except OSError as exc:
            raise CgroupError(f"cannot thaw ({freezer[0]}): {exc.strerror}") from exc

    async def kill_all(self, max_wait: float = 5.0, spare: Collection[int] = ()) -> bool:
        """SIGKILLs every process in the sandbox's cgroups, except `spare`, until none is left.

        Returns True when nothing but `spare` remains, False when processes remained after
        `max_wait` seconds (for example a process stuck in uninterruptible sleep). The freezer (v1
        freezer.state, v2 cgroup.freeze) stops forking between listing and killing; without a
        freezer the loop simply repeats, and pids.max bounds how fast a fork bomb can refill.
        Without `spare`, v2 uses cgroup.kill, which does all of this in the kernel.

        Sparing the sandbox's bwrap lets it reap the sandbox's init itself and exit: killing
        both at once leaves the init a zombie of the host's PID 1 for a while.
        """
        deadline = time.monotonic() + max_wait
        spared = set(spare)
        kill_file = None
        if self.version == 2 and not spared:
            kill_file = os.path.join(next(iter(self.dirs.values())), "cgroup.kill")
        while True:
            victims = [p for p in self.pids() if p not in spared]
            if not victims:
                return True
            if time.monotonic() > deadline:
                return False
            if kill_file is not None:
                try:
                    write_file(kill_file, "1")
                except OSError:
                    kill_file = None  # kernels before 5.14: do it by hand
                else:
                    await asyncio.sleep(0.002)
                    continue
            frozen = await self._freeze()
            self._signal_all(p for p in self.pids() if p not in spared)
            if frozen:
                self._thaw()
            await asyncio.sleep(0.002)

    async def remove(self, max_wait: float = 2.0) -> bool:
        """Removes the directories, retrying while the kernel still calls them busy.

        Returns True when all are gone. A cgroup stays busy for a moment after its last process
        died, until the kernel has released it.
        """
        deadline = time.monotonic() + max_wait
        pending = self.unique_dirs
        delay = 0.001
        while pending:
            still: list[str] = []
            for directory in pending:
                try:
                    os.rmdir(directory)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.EAGAIN):
                        raise CgroupError(f"cannot remove {directory}: {exc.strerror}") from exc
                    still.append(directory)
            pending = still
            if not pending:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True

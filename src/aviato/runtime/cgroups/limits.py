"""The limits the runtime writes: a sandbox's (`Limits`) and all sandboxes' together
(`ParentLimits`, with this machine's defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from aviato.runtime.cgroups.cgroupfs import read_int


@dataclass(frozen=True)
class Limits:
    """Limits in the kernel's units; `cpu_millis` None means no cpu quota."""

    memory_bytes: int
    pids: int
    cpu_millis: int | None = None


@dataclass(frozen=True)
class ParentLimits:
    """Limits of the parent cgroup, for all sandboxes together; 0 leaves a limit as it is."""

    memory_bytes: int = 0
    pids: int = 0

    @classmethod
    def of_this_machine(cls, memory_bytes: int | None, pids: int | None) -> ParentLimits:
        """The given limits, and where one is None, this machine's default for it (so that
        each node of a cluster bounds its sandboxes by its own size)."""
        return cls(
            default_parent_memory_bytes() if memory_bytes is None else memory_bytes,
            default_parent_pids() if pids is None else pids,
        )


def default_parent_memory_bytes() -> int:
    """3/4 of this machine's MemTotal (0, i.e. no limit, when it cannot be read)."""
    return (read_int("/proc/meminfo", "MemTotal:", 1024) or 0) * 3 // 4


def default_parent_pids() -> int:
    """Half of the smaller of kernel.pid_max and kernel.threads-max (0 when unknown)."""
    found = [n for n in (read_int("/proc/sys/kernel/pid_max"),
                         read_int("/proc/sys/kernel/threads-max")) if n]  # fmt: skip
    return min(found) // 2 if found else 0

"""What a sandbox uses now, read from its cgroups: CPU time so far, memory charged, tasks.

Three small kernel files per reading, each opened, read once and closed (no parsing beyond one
integer, or one line of `cpu.stat`):

- v1: `cpuacct.usage` (ns), `memory.usage_in_bytes`, `pids.current`;
- v2: `cpu.stat` (`usage_usec`), `memory.current`, `pids.current`.

Memory is what the kernel charges the cgroup: anonymous memory, the writable layer (tmpfs)
and the page cache of files the sandbox read (reclaimable; `docker stats` subtracts the
inactive part, which would need `memory.stat`, a file of 30-40 lines, on every reading).
Measured here (v1, 2 vCPU): about 25 µs per reading (docs/benchmarks.md, "usage sampling").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from aviato.runtime.cgroups.sandbox import SandboxCgroup

__all__ = ["CgroupReading", "read_usage"]


@dataclass(frozen=True, slots=True)
class CgroupReading:
    """One reading: CPU nanoseconds used so far by every process of the sandbox (all of its
    life), memory charged now (bytes), tasks now. A figure the kernel did not give is -1."""

    cpu_ns: int
    memory_bytes: int
    pids: int


def _read_number(path: str, key: str = "") -> int:
    """The integer in a one-number file, or after `key ` on its line; -1 when unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        data = os.read(fd, 4096)
    except OSError:
        return -1
    finally:
        os.close(fd)
    try:
        if not key:
            return int(data)
        for line in data.split(b"\n"):
            name, _, value = line.partition(b" ")
            if name == key.encode():
                return int(value)
    except ValueError:
        pass
    return -1


def read_usage(cgroup: SandboxCgroup) -> CgroupReading | None:
    """The sandbox's usage now; None when its cgroup is gone (the sandbox ended)."""
    dirs = cgroup.dirs
    memory_dir = dirs.get("memory")
    if memory_dir is None:
        return None
    if cgroup.version == 2:
        cpu_usec = _read_number(os.path.join(memory_dir, "cpu.stat"), "usage_usec")
        cpu = cpu_usec * 1000 if cpu_usec >= 0 else -1
        memory = _read_number(os.path.join(memory_dir, "memory.current"))
        pids = _read_number(os.path.join(memory_dir, "pids.current"))
    else:
        cpuacct = dirs.get("cpuacct")
        cpu = _read_number(os.path.join(cpuacct, "cpuacct.usage")) if cpuacct else -1
        memory = _read_number(os.path.join(memory_dir, "memory.usage_in_bytes"))
        pids_dir = dirs.get("pids")
        pids = _read_number(os.path.join(pids_dir, "pids.current")) if pids_dir else -1
    if memory < 0 and cpu < 0 and pids < 0:
        return None
    return CgroupReading(cpu, memory, pids)

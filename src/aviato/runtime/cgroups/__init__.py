"""Per-sandbox cgroups: memory, pids and cpu limits, OOM accounting and kill-all.

bubblewrap applies no resource limits, so the runtime puts every sandbox in cgroups of its own
before bubblewrap starts: the process that will become bwrap joins them first (see "Joining"
below), so nothing of the sandbox ever runs outside them.

Two layouts are handled:

- **v1** (also the "hybrid" layout, where controllers are mounted one per hierarchy under
  `/sys/fs/cgroup/<controller>` and `/sys/fs/cgroup/unified` holds at most a few): a directory
  `<parent>/<id>` in each of the memory, pids, cpu, cpuacct and freezer hierarchies that exist.
  Memory is limited with `memory.limit_in_bytes` and, when swap accounting exists,
  `memory.memsw.limit_in_bytes` set to the same value so that swap cannot extend the limit.
- **v2** (unified): one directory `<parent>/<id>`; the controllers are enabled in the
  `cgroup.subtree_control` of the parent's ancestors that we may write; `memory.max`,
  `memory.swap.max 0`, `pids.max`, `cpu.max`.

The mode is v1 whenever the v1 memory and pids hierarchies are mounted (a hybrid host whose v2
tree has no controllers cannot enforce anything through v2).

Limits are always on: a sandbox that asks for none still gets the manager's default memory limit
and pids limit. When this process cannot manage cgroups (not root and no delegated, writable
subtree), `available` is False and `reason` says why; the runtime then refuses sandboxes that ask
for limits and runs the others without any.

Joining: writing a pid to `cgroup.procs` (v1 or v2) takes the kernel's global
cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period whenever no migration
happened for a while: about 12 ms on an idle 2-vCPU VM, against 0.1 ms back to back. On v1, a
single-threaded process that writes "0" (itself) to a `tasks` file skips that lock, so the
runtime joins v1 cgroups that way (`thread_files`).

All sandboxes together: the parent's own limits (`CgroupManager.limit_parent`) bound what every
sandbox under it may take at once, since memory and pids are hierarchical in v1 and v2: v1
`memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`) and `pids.max` of the parent in
each hierarchy, v2 `memory.max` and `pids.max` of the parent. A sandbox's writable layer is a
tmpfs whose pages are charged to the memory cgroup of the process that writes them, so the
memory bound covers the writable layers too. Every service that uses the same parent shares
that bound; each one writes its own configured values when it starts.

Killing everything in a sandbox: v2 writes `cgroup.kill`; v1 freezes the freezer cgroup (so that
nothing forks between listing and killing), SIGKILLs every listed pid, thaws, and repeats until
the cgroup is empty.
"""

from aviato.runtime.cgroups.cgroupfs import CgroupError, Mount, parse_mountinfo
from aviato.runtime.cgroups.limits import (
    Limits,
    ParentLimits,
    default_parent_memory_bytes,
    default_parent_pids,
)
from aviato.runtime.cgroups.manager import CgroupManager
from aviato.runtime.cgroups.sandbox import SandboxCgroup
from aviato.runtime.cgroups.usage import CgroupReading, read_usage

__all__ = [
    "CgroupError",
    "CgroupManager",
    "CgroupReading",
    "Limits",
    "Mount",
    "ParentLimits",
    "SandboxCgroup",
    "default_parent_memory_bytes",
    "default_parent_pids",
    "parse_mountinfo",
    "read_usage",
]

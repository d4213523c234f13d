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

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
V1_REQUIRED = ("memory", "pids")
V2_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


class CgroupError(Exception):
    """A cgroup operation failed in a way the caller should report (wraps the OSError)."""


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


def _read_int(path: str, prefix: str = "", scale: int = 1) -> int | None:
    """The integer in `path` (or on its line starting with `prefix`), times `scale`."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(prefix):
                    return int(line[len(prefix) :].split()[0]) * scale
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_parent_memory_bytes() -> int:
    """3/4 of this machine's MemTotal (0, i.e. no limit, when it cannot be read)."""
    return (_read_int("/proc/meminfo", "MemTotal:", 1024) or 0) * 3 // 4


def default_parent_pids() -> int:
    """Half of the smaller of kernel.pid_max and kernel.threads-max (0 when unknown)."""
    found = [n for n in (_read_int("/proc/sys/kernel/pid_max"),
                         _read_int("/proc/sys/kernel/threads-max")) if n]  # fmt: skip
    return min(found) // 2 if found else 0


@dataclass(frozen=True)
class Mount:
    """A cgroup hierarchy as this process sees it."""

    path: str
    version: int  # 1 or 2
    controllers: frozenset[str]


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in a /proc/<pid>/mountinfo text."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        fstype, superopts = rest[0], rest[2]
        mountpoint = fields[4].replace("\\040", " ")
        if fstype == "cgroup":
            opts = set(superopts.split(","))
            mounts.append(Mount(mountpoint, 1, frozenset(opts & set(V1_CONTROLLERS))))
        elif fstype == "cgroup2":
            controllers: frozenset[str] = frozenset()
            with contextlib.suppress(OSError):
                controllers = frozenset(Path(mountpoint, "cgroup.controllers").read_text().split())
            mounts.append(Mount(mountpoint, 2, controllers))
    return mounts


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _read_key(path: str, key: str) -> int:
    """The integer after `key` in a flat-keyed file (memory.events, memory.oom_control)."""
    with contextlib.suppress(OSError, ValueError):
        for line in _read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


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
            return [int(p) for p in _read(os.path.join(directory, "cgroup.procs")).split()]
        except (OSError, ValueError):
            return []

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in this cgroup so far."""
        directory = self._dir("memory")
        if directory is None:
            return 0
        if self.version == 2:
            return _read_key(os.path.join(directory, "memory.events"), "oom_kill")
        return _read_key(os.path.join(directory, "memory.oom_control"), "oom_kill")

    def memory_headroom(self) -> int | None:
        """Bytes the sandbox can still charge before its memory limit, counting only what the
        kernel cannot reclaim (anonymous memory, tmpfs, kernel memory; not the file cache):
        the room left for its writable layer. None when unknown (no memory cgroup)."""
        directory = self._dir("memory")
        if directory is None:
            return None
        try:
            if self.version == 2:
                limit_text = _read(os.path.join(directory, "memory.max")).strip()
                usage = int(_read(os.path.join(directory, "memory.current")).strip())
                prefix = ""
            else:
                limit_text = _read(os.path.join(directory, "memory.limit_in_bytes")).strip()
                usage = int(_read(os.path.join(directory, "memory.usage_in_bytes")).strip())
                prefix = "total_"
            if limit_text == "max":
                return None
            limit = int(limit_text)
            stat = _read(os.path.join(directory, "memory.stat"))
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
            return int(_read(os.path.join(directory, name)).strip())
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
                _write(path, value)
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
            return _read_key(os.path.join(directory, "cgroup.events"), "frozen") == 1
        freezer = self._dir("freezer")
        assert freezer is not None
        return _read(os.path.join(freezer, "freezer.state")).strip() == "FROZEN"

    async def _freeze(self, max_wait: float = 1.0) -> bool:
        """Freezes the cgroup; True when the freezer exists (frozen or still freezing)."""
        freezer = self._freeze_file()
        if freezer is None:
            return False
        try:
            _write(freezer[0], freezer[1])
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
                _write(freezer[0], freezer[2])

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
                    _write(kill_file, "1")
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


class CgroupManager:
    """Finds the cgroup layout once and makes per-sandbox cgroups under `parent`.

    `parent` is a path relative to each hierarchy's mount point (default "aviato"). A path that
    another program manages (e.g. a systemd slice with delegation) may be given instead.
    """

    def __init__(
        self,
        parent: str = "aviato",
        *,
        mountinfo_path: str = "/proc/self/mountinfo",
    ) -> None:
        self.parent = parent.strip("/")
        self.mode = "none"
        self.available = False
        self.reason = ""
        self.controllers: tuple[str, ...] = ()
        self._v1_roots: dict[str, str] = {}  # controller -> parent dir
        self._v2_root: str | None = None
        try:
            text = Path(mountinfo_path).read_text()
        except OSError as exc:
            self.reason = f"cannot read {mountinfo_path}: {exc.strerror}"
            return
        self._setup(parse_mountinfo(text))

    def _setup(self, mounts: list[Mount]) -> None:
        v1: dict[str, str] = {}
        for mount in mounts:
            if mount.version == 1:
                for controller in mount.controllers:
                    v1.setdefault(controller, mount.path)
        v2 = next((m for m in mounts if m.version == 2), None)
        if all(c in v1 for c in V1_REQUIRED):
            self.mode = "v1"
            self._setup_v1(v1)
        elif v2 is not None and {"memory", "pids"} <= v2.controllers:
            self.mode = "v2"
            self._setup_v2(v2)
        else:
            have = sorted(v1) + [f"v2:{c}" for c in sorted(v2.controllers if v2 else ())]
            self.reason = (
                "no usable cgroup hierarchy with the memory and pids controllers "
                f"(found: {', '.join(have) or 'none'})"
            )

    def _setup_v1(self, hierarchies: dict[str, str]) -> None:
        roots: dict[str, str] = {}
        for controller in V1_CONTROLLERS:
            mount = hierarchies.get(controller)
            if mount is None:
                continue
            directory = os.path.join(mount, self.parent)
            try:
                os.makedirs(directory, exist_ok=True)
                if not os.access(directory, os.W_OK):
                    raise PermissionError(errno.EACCES, "not writable")
            except OSError as exc:
                if controller in V1_REQUIRED:
                    self.reason = (
                        f"cannot manage cgroup v1 {controller} at {directory}: {exc.strerror} "
                        "(run the service as root or give it a writable cgroup subtree)"
                    )
                    return
                continue
            roots[controller] = directory
        self._v1_roots = roots
        self.controllers = tuple(c for c in V1_CONTROLLERS if c in roots)
        self.available = True

    def _setup_v2(self, mount: Mount) -> None:
        # Enable the controllers down the path from the mount to our parent directory. Every
        # level except the last must have no processes of its own (cgroup v2's rule), which is
        # true of the root and of parents made for this purpose.
        wanted = [c for c in V2_CONTROLLERS if c in mount.controllers]
        parts = [p for p in self.parent.split("/") if p]
        directory = mount.path
        try:
            for part in [*parts, None]:
                available = set(_read(os.path.join(directory, "cgroup.controllers")).split())
                enabled = set(_read(os.path.join(directory, "cgroup.subtree_control")).split())
                missing = [c for c in wanted if c in available and c not in enabled]
                if missing:
                    _write(
                        os.path.join(directory, "cgroup.subtree_control"),
                        " ".join(f"+{c}" for c in missing),
                    )
                if part is None:
                    break
                directory = os.path.join(directory, part)
                os.makedirs(directory, exist_ok=True)
            enabled = set(_read(os.path.join(directory, "cgroup.subtree_control")).split())
        except OSError as exc:
            self.reason = (
                f"cannot delegate cgroup v2 controllers under {directory}: {exc.strerror} "
                "(run the service as root, or set a delegated cgroup as the parent)"
            )
            return
        if not {"memory", "pids"} <= enabled:
            self.reason = f"cgroup v2 controllers memory and pids not enabled under {directory}"
            return
        self._v2_root = directory
        self.controllers = tuple(c for c in V2_CONTROLLERS if c in enabled)
        self.available = True

    def describe(self) -> str:
        if not self.available:
            return f"unavailable: {self.reason}"
        if self.mode == "v1":
            where = os.path.join("/sys/fs/cgroup/<controller>", self.parent)
            return f"v1 ({', '.join(self.controllers)}) under {where}"
        return f"v2 ({', '.join(self.controllers)}) under {self._v2_root}"

    # -- the parent: all sandboxes together ---------------------------------------------------

    def _parent_files(self) -> tuple[str | None, str | None, str | None]:
        """(memory limit file, memsw limit file or None, pids.max) of the parent."""
        if self.mode == "v2" and self._v2_root is not None:
            root = self._v2_root
            return os.path.join(root, "memory.max"), None, os.path.join(root, "pids.max")
        mem = self._v1_roots.get("memory")
        pids = self._v1_roots.get("pids")
        memsw = None
        if mem is not None and os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
        return (
            os.path.join(mem, "memory.limit_in_bytes") if mem else None,
            memsw,
            os.path.join(pids, "pids.max") if pids else None,
        )

    def limit_parent(self, limits: ParentLimits) -> list[str]:
        """Writes the parent's limits; returns a problem per limit that could not be set.

        v1 refuses (EBUSY) a memory limit below what the sandboxes under it hold now; such a
        limit is reported, not forced (forcing it would OOM-kill running sandboxes).
        """
        if not self.available:
            return [f"cgroups are unavailable: {self.reason}"]
        mem_file, memsw_file, pids_file = self._parent_files()
        problems: list[str] = []
        if limits.memory_bytes > 0 and mem_file is not None:
            value = str(limits.memory_bytes)
            order = [mem_file] + ([memsw_file] if memsw_file else [])
            try:
                for path in order:
                    _write(path, value)
            except OSError as exc:
                if exc.errno != errno.EINVAL or memsw_file is None:
                    problems.append(f"memory {value}: {os.path.basename(path)}: {exc.strerror}")
                else:
                    # Raising the limit: v1 wants memsw >= limit at every step.
                    try:
                        for path in reversed(order):
                            _write(path, value)
                    except OSError as again:
                        problems.append(
                            f"memory {value}: {os.path.basename(path)}: {again.strerror}"
                        )
        if limits.pids > 0 and pids_file is not None:
            try:
                _write(pids_file, str(limits.pids))
            except OSError as exc:
                problems.append(f"pids {limits.pids}: {exc.strerror}")
        return problems

    def parent_limits(self) -> tuple[int | None, int | None]:
        """The parent's (memory limit in bytes, pids.max) as the kernel has them now; None for
        no limit (or unreadable)."""
        mem_file, _, pids_file = self._parent_files()

        def value(path: str | None, unlimited_at: int) -> int | None:
            if path is None:
                return None
            try:
                text = _read(path).strip()
            except OSError:
                return None
            if text == "max" or not text.isdigit() or int(text) >= unlimited_at:
                return None
            return int(text)

        # v1 reports "no limit" as the largest page-aligned value (about 8 EiB).
        return value(mem_file, 1 << 62), value(pids_file, 1 << 62)

    @property
    def supports_cpu(self) -> bool:
        return "cpu" in self.controllers

    def sandbox(self, sandbox_id: str) -> SandboxCgroup:
        """The (possibly not yet created) cgroup of `sandbox_id`."""
        if self.mode == "v2" and self._v2_root is not None:
            d = os.path.join(self._v2_root, sandbox_id)
            return SandboxCgroup(2, {c: d for c in self.controllers})
        return SandboxCgroup(
            1, {c: os.path.join(root, sandbox_id) for c, root in self._v1_roots.items()}
        )

    def create(self, sandbox_id: str, limits: Limits) -> SandboxCgroup:
        """Makes the sandbox's cgroups and writes `limits`; undoes itself on failure."""
        if not self.available:
            raise CgroupError(f"cgroups are unavailable: {self.reason}")
        cg = self.sandbox(sandbox_id)
        made: list[str] = []
        try:
            for directory in cg.unique_dirs:
                try:
                    os.mkdir(directory)
                except FileExistsError:
                    # Left over from an earlier sandbox of the same id: reuse only if empty.
                    if _read(os.path.join(directory, "cgroup.procs")).strip():
                        raise CgroupError(f"{directory} exists and has processes") from None
                made.append(directory)
            cg.apply(limits)
        except OSError as exc:
            self._undo(made)
            raise CgroupError(f"cannot create cgroup for {sandbox_id}: {exc}") from exc
        except CgroupError:
            self._undo(made)
            raise
        return cg

    @staticmethod
    def _undo(dirs: list[str]) -> None:
        for directory in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(directory)

    def present(self) -> list[str]:
        """Sandbox ids that have a cgroup under our parent (for reconciliation)."""
        roots = [self._v2_root] if self._v2_root else list(self._v1_roots.values())
        found: set[str] = set()
        for root in roots:
            with contextlib.suppress(OSError):
                found.update(e.name for e in os.scandir(root) if e.is_dir())
        return sorted(found)

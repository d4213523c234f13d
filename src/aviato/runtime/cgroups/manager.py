"""`CgroupManager`: finds the cgroup layout (v1, hybrid or v2) and the parent under which
sandboxes get theirs, bounds all sandboxes together (the parent's limits), and creates each
sandbox's cgroups."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from aviato.runtime.cgroups.cgroupfs import (
    V1_CONTROLLERS,
    V1_REQUIRED,
    V2_CONTROLLERS,
    CgroupError,
    Mount,
    parse_mountinfo,
    read_file,
    write_file,
)
from aviato.runtime.cgroups.limits import Limits, ParentLimits
from aviato.runtime.cgroups.sandbox import SandboxCgroup


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
                available = set(read_file(os.path.join(directory, "cgroup.controllers")).split())
                enabled = set(read_file(os.path.join(directory, "cgroup.subtree_control")).split())
                missing = [c for c in wanted if c in available and c not in enabled]
                if missing:
                    write_file(
                        os.path.join(directory, "cgroup.subtree_control"),
                        " ".join(f"+{c}" for c in missing),
                    )
                if part is None:
                    break
                directory = os.path.join(directory, part)
                os.makedirs(directory, exist_ok=True)
            enabled = set(read_file(os.path.join(directory, "cgroup.subtree_control")).split())
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
                    write_file(path, value)
            except OSError as exc:
                if exc.errno != errno.EINVAL or memsw_file is None:
                    problems.append(f"memory {value}: {os.path.basename(path)}: {exc.strerror}")
                else:
                    # Raising the limit: v1 wants memsw >= limit at every step.
                    try:
                        for path in reversed(order):
                            write_file(path, value)
                    except OSError as again:
                        problems.append(
                            f"memory {value}: {os.path.basename(path)}: {again.strerror}"
                        )
        if limits.pids > 0 and pids_file is not None:
            try:
                write_file(pids_file, str(limits.pids))
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
                text = read_file(path).strip()
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
                    if read_file(os.path.join(directory, "cgroup.procs")).strip():
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

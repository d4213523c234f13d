"""`BubblewrapRuntime`: sandboxes on this machine with bubblewrap, cgroups, seccomp, a supervisor.

How its host processes start: launch.py. Its handle: sandbox.py.

Per-sandbox host state lives in `<state>/sandboxes/<id>/`: `ctl.sock` (the control socket: the
service binds and listens, the supervisor accepts on the inherited fd 3), `main.log` (fd 4),
`exit` (fd 5), `files/` (mounted files), `runtime.json` (bwrap's pid and start time, for
re-attaching after a service restart) and `runtime.log` (what the launcher, bwrap and the
supervisor print on their stderr; read when a sandbox fails to start).

Sandboxes do not depend on the service: bwrap runs in its own session without
`--die-with-parent`, so killing the service leaves them running, and a new service re-attaches
(`attach`) by checking pid + start time and reconnecting to `ctl.sock`.

How a sandbox ends, and an exec's `oom_killed`: exit_record.py.

Speed: create does no scans (the image's /etc scan and the seccomp filter are computed once),
spawns with `os.posix_spawn` (vfork-style, no Python code in the child) and puts the fds in
place with spawn file actions. bwrap's own start dominates (about 5 ms here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from aviato._private import private_dir
from aviato.images.errors import ImageError
from aviato.images.limits import PullLimits
from aviato.images.store import ImageStore
from aviato.runtime import image_roots, seccomp
from aviato.runtime.base import (
    CapacityExhausted,
    ImageService,
    LimitsUnavailable,
    MainExit,
    PathRefused,
    RegistryCredentials,
    Runtime,
    SandboxConfig,
    SandboxGone,
    SandboxHandle,
    SandboxRuntimeError,
)
from aviato.runtime.bubblewrap.command import (
    Bwrap,
    BwrapUnavailable,
    OwnUserns,
    SpecRefused,
    build_argv,
    environment_args,
    find_bwrap,
)
from aviato.runtime.bubblewrap.facts import describe_parent
from aviato.runtime.bubblewrap.host_processes import (
    ProcessWatch,
    boot_id,
    kill_sandbox,
    out_of_descriptors,
    raise_fd_limit,
    read_tail,
)
from aviato.runtime.bubblewrap.launch import (
    FD_SECCOMP,
    SandboxExists,
    SandboxStartFailed,
    connect_supervisor,
    launcher_for,
    own_userns,
    private_copy,
    staged_launch,
    write_mounted_files,
)
from aviato.runtime.bubblewrap.layer_setup import check_layer, layer_root
from aviato.runtime.bubblewrap.records import (
    open_process,
    read_record,
    sandbox_running,
    settled,
    write_aside,
)
from aviato.runtime.bubblewrap.sandbox import BubblewrapSandbox
from aviato.runtime.bubblewrap.snapshots import thaw_if_marked
from aviato.runtime.cgroups import (
    CgroupError,
    CgroupManager,
    Limits,
    ParentLimits,
    SandboxCgroup,
)
from aviato.runtime.image_service import StoreImages
from aviato.runtime.oci_image_root import image_root
from aviato.runtime.snapshot_store import SnapshotStore
from aviato.runtime.supervisor import SupervisorConnection, supervisor_binary
from aviato.runtime.userns import IdRange, IdRanges, RangesExhausted
from aviato.runtime.writable_layers import Layer, WritableLayers

log = logging.getLogger("aviato.runtime")

GiB = 1 << 30
SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


# How long a new sandbox's supervisor may take to answer. One that dies on the way fails at once
# (its control socket closes); one queued behind others gets this long: in a burst of 1,000 on
# 2 cores the last answer 10-15 s after their spawn, and at 10 s 600 of the 1,000 failed.
CREATE_CONNECT_SECONDS = 60.0


class BubblewrapRuntime(Runtime):
    """Sandboxes on this machine. State under `state_dir/sandboxes/`.

    Limits are always on when cgroups are manageable: every config carries its memory, pids and
    disk, resolved by the service (`runtime.model`); the runtime applies no default of its own.
    `max_sandboxes` caps the running sandboxes of this runtime object (CapacityExhausted beyond).
    `bwrap` and `supervisor` override the binaries (tests, packaging); `cgroup_parent` is the
    cgroup directory, relative to each hierarchy's root, under which sandboxes get theirs, and
    `parent_limits`, when given, are written to it at once: the bound on all sandboxes together
    (None leaves the parent's limits as they are, as tools that only clean up must).
    `start_slots`: how many sandboxes start at once (0: 4 per core, at least 8); the others
    wait for a slot, so that a burst of creates queues instead of thrashing into timeouts.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        max_sandboxes: int = 512,
        cgroup_parent: str = "aviato",
        parent_limits: ParentLimits | None = None,
        bwrap: Bwrap | None = None,
        supervisor: Path | None = None,
        connect_timeout: float = CREATE_CONNECT_SECONDS,
        insecure_registries: tuple[str, ...] = (),
        image_limits: PullLimits | None = None,
        start_slots: int = 0,
    ) -> None:
        self._state_dir = Path(state_dir).absolute()
        self._sandboxes = private_dir(self._state_dir / "sandboxes")
        self._max = max_sandboxes
        self._connect_timeout = connect_timeout
        self._rootless = os.geteuid() != 0
        self._boot_id = boot_id()
        self._bwrap_error: BwrapUnavailable | None = None
        self._bwrap: Bwrap | None = bwrap
        if self._bwrap is None:
            try:
                self._bwrap = find_bwrap()
            except BwrapUnavailable as exc:
                self._bwrap_error = exc
                log.error("sandboxes cannot start: %s", exc)
        self._supervisor_error: SandboxRuntimeError | None = None
        self._supervisor = str(supervisor) if supervisor else ""
        if not self._supervisor:
            try:
                self._supervisor = str(supervisor_binary())
            except SandboxRuntimeError as exc:
                self._supervisor_error = exc
                log.error("sandboxes cannot start: %s", exc)
        # A root service gives every sandbox a user namespace and host uid range of its own.
        self._userns: OwnUserns | None = None
        self._ranges: IdRanges | None = None
        if not self._rootless:
            self._ranges = IdRanges(self._state_dir, sandbox_running)
            self._userns = own_userns(self._state_dir)
            if self._supervisor:
                self._supervisor = private_copy(Path(self._supervisor), self._state_dir / "bin")
        self.layers = None if self._rootless else WritableLayers(self._state_dir)
        self._snapshots = SnapshotStore(self._state_dir / "snapshots")
        self._snapshots.discard_partial()
        self._cgroups = CgroupManager(cgroup_parent)
        if not self._cgroups.available:
            log.warning(
                "cgroups unavailable (%s): sandboxes run without memory/pids/cpu limits and "
                "creates that ask for limits are refused",
                self._cgroups.reason,
            )
        self._parent_problems: list[str] = []
        if parent_limits is not None and self._cgroups.available:
            self._parent_problems = self._cgroups.limit_parent(parent_limits)
            for problem in self._parent_problems:
                log.error(
                    "cannot bound all sandboxes together (cgroup %s): %s",
                    self._cgroups.parent,
                    problem,
                )
        self._seccomp_error = ""
        try:
            seccomp.compile_filter()
        except seccomp.SeccompUnsupported as exc:
            self._seccomp_error = str(exc)
            log.error("sandboxes cannot start: %s", exc)
        image_roots.warm_up()
        self._launcher = launcher_for(self._supervisor)
        self._fd_limit = raise_fd_limit()
        # Sandboxes starting at once: more only thrash (2 cores ran 1,000 bwrap starts at once
        # at a load of 237, and a third of them missed the supervisor's connect timeout).
        self._start_slots = asyncio.Semaphore(start_slots or max(8, 4 * (os.cpu_count() or 1)))
        self._handles: dict[str, BubblewrapSandbox] = {}
        self._running: set[str] = set()
        self._creating: set[str] = set()
        # OCI images (docs/images.md): the node's store, and which image each sandbox uses.
        self.image_store = ImageStore(
            self._state_dir / "images", insecure_registries=insecure_registries,
            limits=image_limits,
        )  # fmt: skip
        self._image_of: dict[str, str] = {}
        self.image_store.in_use = lambda: set(self._image_of.values())
        self._image_service = StoreImages(self.image_store)

    @property
    def images(self) -> ImageService:
        """This node's images, as the runtime interface offers them (`ImageService`)."""
        return self._image_service

    # --- facts ---

    @property
    def supports_protected(self) -> bool:
        """Whether commands can run protected (a second uid in the sandbox's own namespace)."""
        return self._userns is not None

    def release_ids(self, sandbox_id: str, ids: IdRange | None) -> None:
        if ids is not None and self._ranges is not None:
            try:
                self._ranges.release(sandbox_id, ids)
            except OSError as exc:  # stale claims are taken over later anyway
                log.warning("sandbox %s: cannot release uid range %s: %s", sandbox_id, ids, exc)

    def describe(self) -> dict[str, str]:
        rootless = "rootless: one user namespace mapped to the service's uid"
        own = "a user namespace and host uid range of its own per sandbox"
        isolation = "bubblewrap, " + (rootless if self._rootless else own)
        facts = {
            "isolation": isolation,
            "cgroups": self._cgroups.describe(),
            "sandbox_limits": describe_parent(self._cgroups, self._parent_problems),
            "seccomp": self._seccomp_error or seccomp.describe(),
            "supervisor": self._supervisor or str(self._supervisor_error),
            "supervisor_c_library": self._launcher.libc or "not said (an older build)",
            "state_dir": str(self._state_dir),
            "max_sandboxes": str(self._max),
            "fd_limit": str(self._fd_limit),
        }
        if self._bwrap is not None:
            facts.update(self._bwrap.describe())
        else:
            facts["bwrap_path"] = ""
            facts["bwrap_reason"] = str(self._bwrap_error)
        facts.update(image_roots.host_image_facts())
        facts.update(self.image_store.describe())
        return facts

    # --- OCI images ---

    def image_ready(self, image: str) -> bool:
        if not image or image in image_roots.known_images():
            return True
        if self.image_store.pulling(image):
            return False
        found = self.image_store.find(image)
        # A private image is ready only once this create's access to it is checked.
        return found is not None and not self.image_store.is_private(found)

    async def prepare_image(
        self, image: str, credentials: RegistryCredentials | None = None
    ) -> None:
        if image and image not in image_roots.known_images():
            await self.image_store.ensure(image, credentials)

    async def _image_root(
        self, config: SandboxConfig
    ) -> tuple[image_roots.ImageRoot, SandboxConfig]:
        """The sandbox's root, and its config with the image's Entrypoint + Cmd when asked for.

        Built-in images resolve by name; any other name is an OCI image from the store, pulled
        first when missing. Records which image the sandbox uses (so prune keeps it).
        """
        disk = config.disk_bytes
        if not config.image or config.image in image_roots.known_images():
            if config.image_command and not config.command:
                raise SpecRefused(f"image {config.image or 'host'!r} has no Entrypoint or Cmd")
            return image_roots.resolve_image(config.image, disk), config
        if disk <= 0:
            raise PathRefused(f"disk size must be positive, got {disk}")
        stored = await self.image_store.ensure(config.image, config.registry_credentials)
        self._image_of[config.sandbox_id] = stored.digest
        try:
            root = image_root(stored, disk)
        except (ImageError, OSError) as exc:
            self._image_of.pop(config.sandbox_id, None)
            raise ImageError(f"image {config.image}: {exc}") from exc
        if config.image_command and not config.command:
            argv = (*stored.config.entrypoint, *stored.config.cmd)
            if not argv:
                self._image_of.pop(config.sandbox_id, None)
                raise SpecRefused(f"image {config.image!r} has no Entrypoint or Cmd")
            config = replace(config, command=argv)
        return root, config

    def list_present(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._sandboxes) if e.is_dir())
        except OSError:
            return []

    @property
    def snapshots(self) -> SnapshotStore:
        return self._snapshots

    def snapshot_ids(self) -> list[str]:
        return self._snapshots.ids()

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await asyncio.to_thread(self._snapshots.delete, snapshot_id)

    @property
    def cgroups(self) -> CgroupManager:
        return self._cgroups

    def _register(self, handle: BubblewrapSandbox) -> None:
        sid = handle.sandbox_id
        self._handles[sid] = handle
        self._running.add(sid)
        handle._watch.done.add_done_callback(lambda _: self._running.discard(sid))

    # --- create ---

    def _limits_for(self, config: SandboxConfig) -> Limits | None:
        """The cgroup limits of the sandbox (resolved by the service: none defaulted here)."""
        asked = [name for name in ("memory", "pids", "cpu") if name in config.asked_limits]
        if config.cpu_millis is not None and "cpu" not in asked:
            asked.append("cpu")
        if not self._cgroups.available:
            if asked:
                raise LimitsUnavailable(
                    f"this node cannot apply {', '.join(asked)} limits: {self._cgroups.reason}"
                )
            return None
        if config.cpu_millis is not None and not self._cgroups.supports_cpu:
            raise LimitsUnavailable("this node has no cpu cgroup controller for a cpu limit")
        for name, value in (
            ("memory", config.memory_bytes),
            ("pids", config.pids),
            ("cpu", config.cpu_millis),
        ):
            if value is not None and value <= 0:
                raise SpecRefused(f"{name} limit must be positive, got {value}")
        return Limits(
            memory_bytes=config.memory_bytes, pids=config.pids, cpu_millis=config.cpu_millis
        )

    def _check_create(self, config: SandboxConfig) -> None:
        if self._bwrap_error is not None:
            raise self._bwrap_error
        if self._supervisor_error is not None:
            raise self._supervisor_error
        if self._seccomp_error:
            raise SandboxRuntimeError(self._seccomp_error)
        if not SANDBOX_ID.match(config.sandbox_id):
            raise SpecRefused(
                f"invalid sandbox id {config.sandbox_id!r} (letters, digits, '_', '.', '-'; "
                "at most 128)"
            )
        if config.sandbox_id in self._handles or config.sandbox_id in self._creating:
            raise SandboxExists(f"sandbox {config.sandbox_id} already exists on this node")
        if len(self._running) + len(self._creating) >= self._max:
            raise CapacityExhausted(
                f"this node runs its maximum of {self._max} sandboxes; stop some first"
            )

    def check(self, config: SandboxConfig) -> None:
        self._check_create(config)
        self._limits_for(config)
        check_layer(config, self.layers, self._snapshots)
        if config.image in ("", "host"):
            # The host image's layout is known without I/O (scanned at start): where a mounted
            # file or the working directory may go is checked now; other images' in create.
            root = image_roots.resolve_image(config.image, config.disk_bytes)
            root.workdir_args(config.working_dir)
            root.file_mount_args([(path, "/dev/null") for path, _ in config.mounted_files])
            root.directory_mount_args(
                [replace(m, source=m.source or "/") for m in config.mounts],
                [path for path, _ in config.mounted_files],
            )

    async def create(self, config: SandboxConfig) -> SandboxHandle:
        self._check_create(config)
        limits = self._limits_for(config)
        check_layer(config, self.layers, self._snapshots)
        root, config = await self._image_root(config)
        sid = config.sandbox_id
        directory = self._sandboxes / sid
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            self._image_of.pop(sid, None)
            raise SandboxExists(f"sandbox {sid} already has state on this node") from None
        self._creating.add(sid)
        cgroup: SandboxCgroup | None = None
        watch: ProcessWatch | None = None
        ids: IdRange | None = None
        layer: Layer | None = None
        slot = False
        try:
            await self._start_slots.acquire()  # its start (and connect timeout) begins here
            slot = True
            files = write_mounted_files(directory, config)
            userns = None if self._userns is None else self._userns.for_config(config)
            if self.layers is not None and userns is not None:
                layer, root = await layer_root(config, root, self.layers, self._snapshots,
                                               userns)  # fmt: skip
            assert self._bwrap is not None
            argv = build_argv(
                self._bwrap.path,
                config,
                root,
                supervisor=self._supervisor,
                mounted_files=files,
                seccomp_fd=FD_SECCOMP,
                rootless=self._rootless,
                userns=userns,
            )
            launch: list[str] = []
            if self._ranges is not None and userns is not None:
                try:
                    ids = self._ranges.claim(sid)
                except RangesExhausted as exc:
                    raise CapacityExhausted(f"sandbox {sid}: {exc.strerror}") from exc
                launch = staged_launch(ids, userns, config, self.layers, layer)
            if limits is not None:
                try:
                    cgroup = self._cgroups.create(sid, limits)
                except CgroupError as exc:
                    raise SandboxRuntimeError(f"sandbox {sid}: {exc}") from exc
            started = self._launcher.spawn(
                directory, argv, cgroup, launch, environment_args(config, root)
            )
            watch = ProcessWatch(started.pid, started.pidfd, is_child=started.is_child)
            written = write_aside(
                directory, started.pid, self._boot_id, cgroup, ids, self._image_of.get(sid)
            )
            try:
                conn = await connect_supervisor(directory, sid, self._connect_timeout)
            except SandboxRuntimeError as exc:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(watch.done), 0.5)
                detail = read_tail(directory / "runtime.log") or str(exc)
                raise SandboxStartFailed(f"sandbox {sid} failed to start: {detail}") from exc
            finally:
                await settled(written)  # before an abort removes the directory under it
            written.result()  # its error fails the create (the supervisor ends with it)
            handle = BubblewrapSandbox(self, sid, directory, watch, cgroup, conn, ids)
            self._register(handle)
            return handle
        except BaseException as exc:
            self._image_of.pop(sid, None)
            await self._abort_create(directory, watch, cgroup)
            if layer is not None and self.layers is not None:
                await asyncio.to_thread(self.layers.remove, sid)
            self.release_ids(sid, ids)
            if out_of_descriptors(exc):
                raise CapacityExhausted(
                    f"sandbox {sid}: the service ran out of file descriptors (soft "
                    f"RLIMIT_NOFILE {self._fd_limit}): stop some sandboxes or raise the limit"
                ) from exc
            raise
        finally:
            if slot:
                self._start_slots.release()
            self._creating.discard(sid)

    async def _abort_create(
        self, directory: Path, watch: ProcessWatch | None, cgroup: SandboxCgroup | None
    ) -> None:
        with contextlib.suppress(Exception):
            if watch is not None:
                await kill_sandbox(watch, cgroup)
                watch.detach()
            elif cgroup is not None:
                await cgroup.kill_all()
            if cgroup is not None:
                await cgroup.remove()
        shutil.rmtree(directory, ignore_errors=True)

    # --- attach, cleanup, close ---

    def _cgroup_from(self, sid: str, record: dict[str, Any] | None) -> SandboxCgroup | None:
        info = record.get("cgroup") if record else None
        if isinstance(info, dict) and isinstance(info.get("dirs"), dict):
            return SandboxCgroup(int(info.get("version", 1)), dict(info["dirs"]))
        if self._cgroups.available:
            cg = self._cgroups.sandbox(sid)
            return cg if cg.exists() else None
        return None

    async def attach(self, sandbox_id: str) -> SandboxHandle | MainExit:
        handle = self._handles.get(sandbox_id)
        if handle is not None and not handle._closed:
            return handle if handle.running else await handle.wait_exit()
        if not SANDBOX_ID.match(sandbox_id):
            raise SpecRefused(f"invalid sandbox id {sandbox_id!r}")
        directory = self._sandboxes / sandbox_id
        if not directory.is_dir():
            raise SandboxGone(f"sandbox {sandbox_id} has no state on this node")
        record = read_record(directory)
        cgroup = self._cgroup_from(sandbox_id, record)
        if record and isinstance(record.get("image_digest"), str):
            self._image_of[sandbox_id] = record["image_digest"]
        opened = open_process(record, self._boot_id)
        if opened is None:
            dead = BubblewrapSandbox(
                self, sandbox_id, directory, ProcessWatch(0, None, False), cgroup, None
            )
            if cgroup is not None and cgroup.pids():
                await cgroup.kill_all()
            return dead._compute_exit()
        pid, pidfd, is_child = opened
        thaw_if_marked(directory, cgroup)
        watch_live = ProcessWatch(pid, pidfd, is_child)
        conn: SupervisorConnection | None = None
        try:
            if cgroup is None or not cgroup.frozen():  # a paused one answers once resumed
                conn = await connect_supervisor(directory, sandbox_id, 5.0)
        except SandboxRuntimeError as exc:
            log.warning(
                "sandbox %s runs but its supervisor does not answer (%s): killing it",
                sandbox_id,
                exc,
            )
            conn = None
        ids = None
        if self._ranges is not None and isinstance(record, dict):
            slot = record.get("uid_slot")
            if isinstance(slot, int):
                ids = self._ranges.adopt(sandbox_id, slot)
        handle = BubblewrapSandbox(self, sandbox_id, directory, watch_live, cgroup, conn, ids)
        self._register(handle)
        if conn is None and not await handle.paused():
            return await handle.kill()
        return handle

    def keep_log(self, sandbox_id: str, into: Path) -> None:
        if not SANDBOX_ID.match(sandbox_id):
            raise SpecRefused(f"invalid sandbox id {sandbox_id!r}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(self._sandboxes / sandbox_id / "main.log", into)

    async def cleanup(self, sandbox_id: str) -> None:
        if not SANDBOX_ID.match(sandbox_id):
            raise SpecRefused(f"invalid sandbox id {sandbox_id!r}")
        directory = self._sandboxes / sandbox_id
        handle = self._handles.pop(sandbox_id, None)
        if handle is None and directory.is_dir():
            attached = await self.attach(sandbox_id)
            handle = self._handles.pop(sandbox_id, None)
            if isinstance(attached, BubblewrapSandbox):
                handle = attached
        if handle is not None:
            if handle.running:
                await handle.kill()
            await handle._close()
            cgroup = handle.cgroup
        else:
            cgroup = self._cgroup_from(sandbox_id, read_record(directory))
        self._running.discard(sandbox_id)
        self._image_of.pop(sandbox_id, None)
        if cgroup is None and self._cgroups.available:
            cgroup = self._cgroups.sandbox(sandbox_id)
        if cgroup is not None:
            if cgroup.pids():
                await cgroup.kill_all()
            if not await cgroup.remove():
                log.warning(
                    "sandbox %s: cgroup still busy, left behind: %s", sandbox_id, cgroup.unique_dirs
                )
        if self.layers is not None:
            try:
                await asyncio.to_thread(self.layers.remove, sandbox_id)
            except SandboxRuntimeError as exc:
                log.warning("sandbox %s: writable layer left behind: %s", sandbox_id, exc)
        shutil.rmtree(directory, ignore_errors=True)

    async def close(self) -> None:
        handles = list(self._handles.values())
        self._handles.clear()
        self._running.clear()
        for handle in handles:
            await handle._close()
        self._launcher.close()
        if self.layers is not None:  # its root's bind, when no sandbox's layer is left
            await asyncio.to_thread(self.layers.release_root)

"""`LocalRuntime`: sandboxes on this machine with bubblewrap, cgroups, seccomp and a supervisor.

One sandbox on the host:

```
service ──posix_spawn──► sh -c JOIN_SCRIPT            (cgroup v1: joins via `tasks`, see cgroups.py)
          └─exec─► aviato-supervisor --launch         (v2: joins via cgroup.procs; setsid)
                            └─exec─► bwrap            (host-side monitor; stays until the end)
                                       └─► /.aviato/supervisor   PID 1 of the sandbox
                                              ├─ main process (or none: --keepalive)
                                              └─ exec'd commands
```

Per-sandbox host state lives in `<state>/sandboxes/<id>/`: `ctl.sock` (the control socket: the
service binds and listens, the supervisor accepts on the inherited fd 3), `main.log` (fd 4),
`exit` (fd 5), `files/` (mounted files), `runtime.json` (bwrap's pid and start time, for
re-attaching after a service restart) and `runtime.log` (what the launcher, bwrap and the
supervisor print on their stderr; read when a sandbox fails to start).

Sandboxes do not depend on the service: bwrap runs in its own session without
`--die-with-parent`, so killing the service leaves them running, and a new service re-attaches
(`attach`) by checking pid + start time and reconnecting to `ctl.sock`.

How a sandbox ends is read from the exit file the supervisor writes as its last act, plus the
cgroup's OOM counter: `reason` is "max lifetime exceeded" or "lease expired" when the supervisor
ended it at the deadline the service gave it (`set_deadline`: enforced also while the service is
down); "OOMKilled" when the OOM killer struck and the main process died of SIGKILL or exited with
137 (a shell passing on its command's SIGKILL), or no record was written; "signal from inside:
..." when a process of the sandbox sent its init SIGTERM/SIGINT; "killed" when we killed it,
"lost" when it vanished without a record for another reason.

An exec's `oom_killed` uses the same counter: read when the command starts and again if it dies of
SIGKILL (or its shell reports 137) without a timeout or a kill of ours. The counter is the
sandbox's: a command killed by something else while another process of the sandbox is OOM-killed
is reported as OOM-killed too.

Speed: create does no scans (the image's /etc scan and the seccomp filter are computed once),
spawns with `os.posix_spawn` (vfork-style, no Python code in the child) and puts the fds in
place with spawn file actions. bwrap's own start dominates (about 5 ms here).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from aviato._private import DIR_MODE, MOUNTED_FILE_MODE, SANDBOX_BINARY_MODE, private_dir
from aviato.images.errors import ImageError
from aviato.images.limits import PullLimits
from aviato.images.root import image_root
from aviato.images.store import ImageStore
from aviato.runtime import images, seccomp
from aviato.runtime.base import (
    CapacityExhausted,
    ExecHandle,
    ExecSpec,
    FileInfo,
    ImageService,
    LimitsUnavailable,
    LogRecord,
    MainExit,
    PathRefused,
    RegistryCredentials,
    Runtime,
    SandboxConfig,
    SandboxGone,
    SandboxHandle,
    SandboxRuntimeError,
)
from aviato.runtime.bwrap import (
    Bwrap,
    BwrapUnavailable,
    OwnUserns,
    SpecRefused,
    build_argv,
    find_bwrap,
)
from aviato.runtime.cgroups import (
    CgroupError,
    CgroupManager,
    Limits,
    ParentLimits,
    SandboxCgroup,
)
from aviato.runtime.image_service import StoreImages
from aviato.runtime.images import ImageRoot
from aviato.runtime.logs import read_log
from aviato.runtime.supervisor import SupervisorConnection, supervisor_binary
from aviato.runtime.userns import IdRange, IdRanges, RangesExhausted

log = logging.getLogger("aviato.runtime")

GiB = 1 << 30
# Where the inherited descriptors land in the launcher, bwrap and the supervisor.
FD_CONTROL, FD_LOG, FD_EXIT, FD_SECCOMP = 3, 4, 5, 6
SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the NUL
# Where a root service's launcher shows bwrap the id-mapped state directory (in a mount
# namespace of the launcher's own; on the host it stays an empty directory).
STAGE_AT = "/run/aviato/stage"
OOM_SCORE_ADJ = 500  # sandboxes go before the service when the whole host runs out of memory
LAUNCH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
# Joins the cgroups given as arguments up to "--" by writing "0" to their `tasks` files, then
# executes the rest (the supervisor's launcher). Paths travel as arguments, never in the script.
JOIN_SCRIPT = 'while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; shift; exec "$@"'
# Dispositions reset to default in the launcher: an ignored signal (SIGPIPE in every Python
# process, SIGINT/SIGQUIT for a service started in the background) would stay ignored in bwrap,
# the supervisor and the sandbox's processes.
_SIGDEF = tuple(
    sorted(
        int(s)
        for s in signal.valid_signals()
        if int(s) < 32 and s not in (signal.SIGKILL, signal.SIGSTOP)
    )
)


def _inheritable_fds() -> list[int]:
    """Descriptors >= 3 of this process without close-on-exec (ours never are; a parent's or a
    library's may be). The spawn closes them so that they cannot leak into a sandbox."""
    found: list[int] = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for name in names:
        fd = int(name)
        if fd < 3:
            continue
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                found.append(fd)
        except OSError:
            pass  # the listdir's own fd, or one closed meanwhile
    return found


class SandboxExists(SandboxRuntimeError):
    code = "ALREADY_EXISTS"


class SandboxStartFailed(SandboxRuntimeError):
    """bwrap or the supervisor failed before the supervisor said HELLO."""

    code = "INTERNAL"


# --- host process helpers ---------------------------------------------------------------------


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


def _out_of_descriptors(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is EMFILE or ENFILE."""
    for _ in range(5):
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            return True
        exc = exc.__cause__
    return False


def _show_bytes(n: int) -> str:
    for unit, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n} bytes"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[int, int] | None:
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


def _sandbox_running(directory: Path) -> bool | None:
    """Whether the sandbox with state `directory` (of any service of this host) still runs: its
    bwrap (pid and start time from runtime.json) is alive. None while it has no record."""
    try:
        record = json.loads((directory / "runtime.json").read_text())
        pid, starttime = int(record["pid"]), int(record["starttime"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == starttime


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _read_tail(path: Path, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def parse_exit_file(text: str) -> tuple[int, int, int, str] | None:
    """`exit_code signal time_ns [why]` → the three numbers and `why` ("" when absent); None for
    an empty or torn record."""
    parts = text.split()
    if len(parts) not in (3, 4):
        return None
    try:
        code, signo, ended = (int(p) for p in parts[:3])
    except ValueError:
        return None
    return code, signo, ended, parts[3] if len(parts) == 4 else ""


_DEADLINE_REASONS = {
    "deadline:lifetime": "max lifetime exceeded",
    "deadline:lease": "lease expired",
}


def _inside_signal_reason(why: str) -> str:
    """`signal:SIG:PID` (the supervisor's record of a signal sent from inside) → a reason."""
    try:
        _, signo, pid = why.split(":")
        name, sender = signal.Signals(int(signo)).name, int(pid)
    except ValueError:
        return ""
    by = f"by its pid {sender}" if sender else "not by kill() (e.g. an I/O signal aimed at it)"
    return f"signal from inside: {name} sent to the sandbox's init {by}"


class _ProcessWatch:
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


async def _kill_sandbox(watch: _ProcessWatch, cgroup: SandboxCgroup | None) -> None:
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
        for child in _children(watch.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
    try:
        await asyncio.wait_for(asyncio.shield(watch.done), 2.0)
    except TimeoutError:
        watch.send(signal.SIGKILL)
        if cgroup is not None:
            await cgroup.kill_all()


# A file written into a sandbox lands on its writable layer, a tmpfs whose pages count against
# the sandbox's memory limit: an upload may use the memory the sandbox has left, less this much
# (bytes still in flight to the supervisor, and room for its processes), and is refused beyond.
UPLOAD_MEMORY_MARGIN = 16 << 20
_UPLOAD_RECHECK_BYTES = 32 << 20


async def _within_memory(
    cgroup: SandboxCgroup, path: str, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """`chunks`, ended with the disk-full error before they would run the sandbox's memory out.

    With a disk as large as the memory (the defaults), a full disk means full memory, and the
    kernel's answer to a tmpfs write beyond the memory limit is the OOM killer, which takes the
    sandbox down, not ENOSPC. Memory is re-read once the known room is used up (or every
    32 MiB); what the sandbox's own processes take meanwhile is theirs to answer for.
    """
    room: int | None = None
    since = 0
    async for chunk in chunks:
        if room is None or room < len(chunk) or since >= _UPLOAD_RECHECK_BYTES:
            headroom = cgroup.memory_headroom()
            room = None if headroom is None else headroom - UPLOAD_MEMORY_MARGIN
            since = 0
            if room is not None and room < len(chunk):
                raise CapacityExhausted(
                    f"{path}: No space left on device: the sandbox's files are kept in its "
                    "memory, and its memory limit is reached (ask for more memory, or less disk)"
                )
        if room is not None:
            room -= len(chunk)
        since += len(chunk)
        yield chunk


# --- the sandbox handle -----------------------------------------------------------------------


class LocalSandbox(SandboxHandle):
    """A running (or finished) sandbox on this node."""

    def __init__(
        self,
        runtime: LocalRuntime,
        sandbox_id: str,
        directory: Path,
        watch: _ProcessWatch,
        cgroup: SandboxCgroup | None,
        conn: SupervisorConnection | None,
        ids: IdRange | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self._ids = ids
        self._runtime = runtime
        self._dir = directory
        self._watch = watch
        self._cgroup = cgroup
        self._conn = conn
        self._killed = False
        self._exit: MainExit | None = None
        self._closed = False
        self._reconnect_lock = asyncio.Lock()

    # --- facts ---

    @property
    def log_path(self) -> Path:
        """This runtime's file of the main log (runtime/logs.py reads it)."""
        return self._dir / "main.log"

    def logs(
        self, since_ns: int = 0, tail: int = -1, follow: bool = False
    ) -> AsyncIterator[LogRecord]:
        return read_log(self.log_path, since_ns, tail, follow, lambda: not self.running)

    @property
    def pid(self) -> int:
        """Host pid of the sandbox's bwrap process."""
        return self._watch.pid

    @property
    def cgroup(self) -> SandboxCgroup | None:
        return self._cgroup

    @property
    def running(self) -> bool:
        return not self._watch.done.done()

    # --- the supervisor connection ---

    async def _connection(self) -> SupervisorConnection:
        if not self.running:
            raise SandboxGone(f"sandbox {self.sandbox_id} has ended")
        if self._closed:
            raise SandboxGone(f"sandbox {self.sandbox_id}: the runtime was closed")
        conn = self._conn
        if conn is not None and not conn.is_closed:
            return conn
        async with self._reconnect_lock:
            if self._conn is None or self._conn.is_closed:
                self._conn = await self._runtime._connect(self._dir, self.sandbox_id, 5.0)
            return self._conn

    async def exec(self, spec: ExecSpec) -> ExecHandle:
        if spec.protected and not self._runtime.supports_protected:
            raise LimitsUnavailable(
                "protected commands need a sandbox with a user namespace and host uid range of "
                "its own, which this node gives only when its aviato service runs as root"
            )
        if spec.tty and "TERM" not in spec.env:
            spec = replace(spec, env={**spec.env, "TERM": "xterm-256color"})
        conn = await self._connection()
        handle = await conn.exec(spec)
        if self._cgroup is not None:  # read once the EXEC is on its way: overlaps its start
            handle.oom_probe = (self._cgroup.oom_kills, self._cgroup.oom_kills())
        return handle

    async def read_file(self, path: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        conn = await self._connection()
        return await conn.read_file(path)

    async def write_file(
        self, path: str, mode: int, make_parents: bool, chunks: AsyncIterator[bytes]
    ) -> int:
        conn = await self._connection()
        if self._cgroup is not None:
            chunks = _within_memory(self._cgroup, path, chunks)
        return await conn.write_file(path, mode, make_parents, chunks)

    async def set_deadline(self, at_ns: int, why: str, grace_seconds: float) -> None:
        conn = await self._connection()
        conn.set_deadline(at_ns, grace_seconds, why)

    # --- ending ---

    def _compute_exit(self) -> MainExit:
        try:
            record = parse_exit_file((self._dir / "exit").read_text())
        except OSError:
            record = None
        ooms = self._cgroup.oom_kills() if self._cgroup is not None else 0
        if record is not None:
            code, signo, ended, why = record
            if why in _DEADLINE_REASONS:
                return MainExit(code, signo, ended, _DEADLINE_REASONS[why])
            # Killed by the OOM killer: SIGKILL itself, or a shell that reports its command's
            # SIGKILL as 137 (`sh -c 'big; exit $?'`) while the cgroup counted an OOM kill.
            oom_death = signo == signal.SIGKILL or (signo == 0 and code == 128 + signal.SIGKILL)
            reason = "OOMKilled" if ooms and oom_death else ""
            if not reason and why.startswith("signal:"):
                reason = _inside_signal_reason(why)
            return MainExit(code, signo, ended, reason)
        if ooms:
            reason = "OOMKilled"
        elif self._killed:
            reason = "killed"
        else:
            reason = "lost"
        code = 128 + signal.SIGKILL if reason != "lost" else -1
        signo = signal.SIGKILL if reason != "lost" else 0
        return MainExit(code, signo, time.time_ns(), reason)

    async def _ended(self) -> MainExit:
        await asyncio.shield(self._watch.done)
        if self._exit is None:
            # bwrap is gone, so the pid namespace is empty; anything left in the cgroup escaped
            # it (impossible by design) or was a half-started launcher: make sure.
            if self._cgroup is not None and self._cgroup.pids():
                await self._cgroup.kill_all()
            self._exit = self._compute_exit()
            if self._conn is not None:
                await self._conn.close()
            self._runtime._release_ids(self.sandbox_id, self._ids)
            self._ids = None
        return self._exit

    async def wait_exit(self) -> MainExit:
        return await self._ended()

    async def terminate(self, grace_seconds: float) -> MainExit:
        if not self.running:
            return await self._ended()
        with contextlib.suppress(SandboxRuntimeError, OSError, asyncio.TimeoutError):
            async with asyncio.timeout(max(grace_seconds, 0.1)):
                await self._send_terminate()
        if grace_seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._watch.done), grace_seconds)
        if not self.running:
            return await self._ended()
        return await self.kill()

    async def _send_terminate(self) -> None:
        """TERMINATE, never queued behind data: when the shared connection still has stdin or
        file bytes on their way, it goes over a connection of its own."""
        conn = await self._connection()
        if not conn.write_backlog:
            await conn.terminate(signal.SIGTERM)
            return
        own = await self._runtime._connect(self._dir, self.sandbox_id, 5.0)
        try:
            await own.terminate(signal.SIGTERM)
        finally:
            await own.close()  # after the frame went out

    async def kill(self) -> MainExit:
        if not self.running:
            return await self._ended()
        self._killed = True
        await self._kill_processes()
        try:
            await asyncio.wait_for(asyncio.shield(self._watch.done), 10.0)
        except TimeoutError:
            self._watch.send(signal.SIGKILL)
            await asyncio.wait_for(asyncio.shield(self._watch.done), 5.0)
        return await self._ended()

    async def _kill_processes(self) -> None:
        await _kill_sandbox(self._watch, self._cgroup)

    async def _close(self) -> None:
        """Forgets the sandbox without stopping it (runtime shutdown)."""
        self._closed = True
        self._watch.detach()
        if self._conn is not None:
            await self._conn.close()


# --- the runtime ------------------------------------------------------------------------------


class LocalRuntime(Runtime):
    """Sandboxes on this machine. State under `state_dir/sandboxes/`.

    Limits are always on when cgroups are manageable: every config carries its memory, pids and
    disk, resolved by the service (`runtime.model`); the runtime applies no default of its own.
    `max_sandboxes` caps the running sandboxes of this runtime object (CapacityExhausted beyond).
    `bwrap` and `supervisor` override the binaries (tests, packaging); `cgroup_parent` is the
    cgroup directory, relative to each hierarchy's root, under which sandboxes get theirs, and
    `parent_limits`, when given, are written to it at once: the bound on all sandboxes together
    (None leaves the parent's limits as they are, as tools that only clean up must).
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
        connect_timeout: float = 10.0,
        insecure_registries: tuple[str, ...] = (),
        image_limits: PullLimits | None = None,
    ) -> None:
        self._state_dir = Path(state_dir).absolute()
        self._sandboxes = private_dir(self._state_dir / "sandboxes")
        self._max = max_sandboxes
        self._connect_timeout = connect_timeout
        self._rootless = os.geteuid() != 0
        self._boot_id = _boot_id()
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
            self._ranges = IdRanges(self._state_dir, _sandbox_running)
            self._userns = OwnUserns(str(self._state_dir), STAGE_AT)
            os.makedirs(STAGE_AT, mode=0o755, exist_ok=True)
            if self._supervisor:
                self._supervisor = _private_copy(Path(self._supervisor), self._state_dir / "bin")
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
        images.warm_up()
        self._oom_adj = self._launch_oom_adj()
        self._sh = shutil.which("sh", path=LAUNCH_ENV["PATH"])
        self._fd_limit = raise_fd_limit()
        self._handles: dict[str, LocalSandbox] = {}
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
        return self._image_service

    @staticmethod
    def _launch_oom_adj() -> list[str]:
        # Raising oom_score_adj needs no privilege, lowering needs CAP_SYS_RESOURCE.
        try:
            current = int(Path("/proc/self/oom_score_adj").read_text())
        except (OSError, ValueError):
            return []
        return ["--oom-score-adj", str(OOM_SCORE_ADJ)] if current < OOM_SCORE_ADJ else []

    # --- facts ---

    @property
    def supports_protected(self) -> bool:
        """Whether commands can run protected (a second uid in the sandbox's own namespace)."""
        return self._userns is not None

    def _release_ids(self, sandbox_id: str, ids: IdRange | None) -> None:
        if ids is not None and self._ranges is not None:
            try:
                self._ranges.release(sandbox_id, ids)
            except OSError as exc:  # stale claims are taken over later anyway
                log.warning("sandbox %s: cannot release uid range %s: %s", sandbox_id, ids, exc)

    def describe(self) -> dict[str, str]:
        isolation = "bubblewrap, " + (
            "rootless: one user namespace mapped to the service's uid"
            if self._rootless
            else "a user namespace and host uid range of its own per sandbox"
        )
        facts = {
            "isolation": isolation,
            "cgroups": self._cgroups.describe(),
            "sandbox_limits": self._describe_parent(),
            "seccomp": self._seccomp_error or seccomp.describe(),
            "supervisor": self._supervisor or str(self._supervisor_error),
            "state_dir": str(self._state_dir),
            "max_sandboxes": str(self._max),
            "fd_limit": str(self._fd_limit),
        }
        if self._bwrap is not None:
            facts.update(self._bwrap.describe())
        else:
            facts["bwrap_path"] = ""
            facts["bwrap_reason"] = str(self._bwrap_error)
        facts.update(images.host_image_facts())
        facts.update(self.image_store.describe())
        return facts

    def _describe_parent(self) -> str:
        """The bound on all sandboxes together, as the kernel has it now."""
        if not self._cgroups.available:
            return "none (no cgroups)"
        memory, pids = self._cgroups.parent_limits()
        text = (
            f"memory {_show_bytes(memory) if memory is not None else 'no limit'}, "
            f"pids {pids if pids is not None else 'no limit'} "
            f"(parent cgroup {self._cgroups.parent})"
        )
        if self._parent_problems:
            text += "; not set: " + "; ".join(self._parent_problems)
        return text

    # --- OCI images ---

    def image_ready(self, image: str) -> bool:
        if not image or image in images.known_images():
            return True
        if self.image_store.pulling(image):
            return False
        found = self.image_store.find(image)
        # A private image is ready only once this create's access to it is checked.
        return found is not None and not self.image_store.is_private(found)

    async def prepare_image(
        self, image: str, credentials: RegistryCredentials | None = None
    ) -> None:
        if image and image not in images.known_images():
            await self.image_store.ensure(image, credentials)

    async def _image_root(self, config: SandboxConfig) -> tuple[ImageRoot, SandboxConfig]:
        """The sandbox's root, and its config with the image's Entrypoint + Cmd when asked for.

        Built-in images resolve by name; any other name is an OCI image from the store, pulled
        first when missing. Records which image the sandbox uses (so prune keeps it).
        """
        disk = config.disk_bytes
        if not config.image or config.image in images.known_images():
            if config.image_command and not config.command:
                raise SpecRefused(f"image {config.image or 'host'!r} has no Entrypoint or Cmd")
            return images.resolve_image(config.image, disk), config
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
    def cgroups(self) -> CgroupManager:
        return self._cgroups

    def _register(self, handle: LocalSandbox) -> None:
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
        if config.network not in ("", "none"):
            raise SpecRefused(
                f"network mode {config.network!r} is not supported; only 'none' (loopback)"
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
        if config.image in ("", "host"):
            # The host image's layout is known without I/O (scanned once at start), so where a
            # mounted file or the working directory may go is checked now; other images only
            # once they are pulled, in create.
            root = images.resolve_image(config.image, config.disk_bytes)
            root.workdir_args(config.working_dir)
            root.file_mount_args([(path, "/dev/null") for path, _ in config.mounted_files])

    async def create(self, config: SandboxConfig) -> SandboxHandle:
        self._check_create(config)
        limits = self._limits_for(config)
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
        watch: _ProcessWatch | None = None
        ids: IdRange | None = None
        try:
            files = self._write_files(directory, config)
            assert self._bwrap is not None
            argv = build_argv(
                self._bwrap.path,
                config,
                root,
                supervisor=self._supervisor,
                mounted_files=files,
                seccomp_fd=FD_SECCOMP,
                rootless=self._rootless,
                userns=self._userns,
            )
            launch: list[str] = []
            if self._ranges is not None and self._userns is not None:
                try:
                    ids = self._ranges.claim(sid)
                except RangesExhausted as exc:
                    raise CapacityExhausted(f"sandbox {sid}: {exc.strerror}") from exc
                launch = [*ids.launcher_args(), "--stage",
                          f"{self._userns.stage_from}:{self._userns.stage_at}"]  # fmt: skip
            if limits is not None:
                try:
                    cgroup = self._cgroups.create(sid, limits)
                except CgroupError as exc:
                    raise SandboxRuntimeError(f"sandbox {sid}: {exc}") from exc
            pid = self._spawn(directory, argv, cgroup, launch)
            watch = _ProcessWatch(pid, os.pidfd_open(pid), is_child=True)
            self._write_record(directory, pid, cgroup, ids)
            try:
                conn = await self._connect(directory, sid, self._connect_timeout)
            except SandboxRuntimeError as exc:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(watch.done), 0.5)
                detail = _read_tail(directory / "runtime.log") or str(exc)
                raise SandboxStartFailed(f"sandbox {sid} failed to start: {detail}") from exc
            handle = LocalSandbox(self, sid, directory, watch, cgroup, conn, ids)
            self._register(handle)
            return handle
        except BaseException as exc:
            self._image_of.pop(sid, None)
            await self._abort_create(directory, watch, cgroup)
            self._release_ids(sid, ids)
            if _out_of_descriptors(exc):
                raise CapacityExhausted(
                    f"sandbox {sid}: the service ran out of file descriptors (soft "
                    f"RLIMIT_NOFILE {self._fd_limit}): stop some sandboxes or raise the limit"
                ) from exc
            raise
        finally:
            self._creating.discard(sid)

    async def _abort_create(
        self, directory: Path, watch: _ProcessWatch | None, cgroup: SandboxCgroup | None
    ) -> None:
        with contextlib.suppress(Exception):
            if watch is not None:
                await _kill_sandbox(watch, cgroup)
                watch.detach()
            elif cgroup is not None:
                await cgroup.kill_all()
            if cgroup is not None:
                await cgroup.remove()
        shutil.rmtree(directory, ignore_errors=True)

    @staticmethod
    def _write_files(directory: Path, config: SandboxConfig) -> list[tuple[str, str]]:
        if not config.mounted_files:
            return []
        files_dir = directory / "files"
        files_dir.mkdir(mode=DIR_MODE)
        out: list[tuple[str, str]] = []
        for index, (path, data) in enumerate(config.mounted_files):
            host = files_dir / str(index)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(host, flags, MOUNTED_FILE_MODE)
            try:
                os.fchmod(fd, MOUNTED_FILE_MODE)  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            out.append((path, str(host)))
        return out

    def _spawn(
        self,
        directory: Path,
        argv: list[str],
        cgroup: SandboxCgroup | None,
        launch: list[str],
    ) -> int:
        """Starts launcher → bwrap → supervisor with fds 3-6 in place; returns the host pid.

        `launch`: more options of the launcher (its user namespace)."""
        opened: list[int] = []
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short_path(directory / "ctl.sock") as path:
                sock.bind(path)
                os.chmod(path, 0o600)
            sock.listen(64)
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
            opened.append(os.open(directory / "main.log", flags | os.O_APPEND, 0o600))
            opened.append(os.open(directory / "exit", flags | os.O_TRUNC, 0o600))
            opened.append(seccomp.filter_fd())
            opened.append(os.open(directory / "runtime.log", flags | os.O_APPEND, 0o600))
            # Copies at fd >= 10 so that no dup2 below overwrites a source it still needs.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (sock.fileno(), *opened)]
            opened += high
            ctl, main_log, exit_file, filt, err = high
            actions: list[tuple[Any, ...]] = [
                (os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()
            ]
            actions += [
                (os.POSIX_SPAWN_DUP2, ctl, FD_CONTROL),
                (os.POSIX_SPAWN_DUP2, main_log, FD_LOG),
                (os.POSIX_SPAWN_DUP2, exit_file, FD_EXIT),
                (os.POSIX_SPAWN_DUP2, filt, FD_SECCOMP),
                (os.POSIX_SPAWN_DUP2, err, 1),
                (os.POSIX_SPAWN_DUP2, err, 2),
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            ]
            program = self._supervisor
            launcher = [self._supervisor, "--launch", *self._oom_adj]
            if cgroup is not None and cgroup.thread_files and self._sh:
                # v1: join by writing "0" to `tasks` from a shell that then becomes the launcher
                # (see cgroups.py: 12 ms less after an idle spell than joining via cgroup.procs).
                launcher = [self._sh, "-c", JOIN_SCRIPT, "sh", *cgroup.thread_files, "--",
                            *launcher]  # fmt: skip
                program = self._sh
            elif cgroup is not None:
                for procs in cgroup.procs_files:
                    launcher += ["--cgroup-procs", procs]
            launcher += [*launch, "--", *argv]
            try:
                return os.posix_spawn(
                    program,
                    launcher,
                    LAUNCH_ENV,
                    file_actions=actions,
                    setsigdef=_SIGDEF,
                    setsigmask=(),
                )
            except OSError as exc:
                raise SandboxRuntimeError(f"cannot start {self._supervisor}: {exc}") from exc
        finally:
            sock.close()
            for fd in opened:
                os.close(fd)

    def _write_record(
        self, directory: Path, pid: int, cgroup: SandboxCgroup | None, ids: IdRange | None
    ) -> None:
        stat = _proc_stat(pid)
        record: dict[str, Any] = {
            "pid": pid,
            "starttime": stat[1] if stat else 0,
            "boot_id": self._boot_id,
            "cgroup": None if cgroup is None else {"version": cgroup.version, "dirs": cgroup.dirs},
        }
        if directory.name in self._image_of:
            record["image_digest"] = self._image_of[directory.name]
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

    async def _connect(self, directory: Path, sid: str, wait: float) -> SupervisorConnection:
        try:
            with _short_path(directory / "ctl.sock") as path:
                return await SupervisorConnection.connect(path, wait)
        except SandboxRuntimeError:
            raise
        except (TimeoutError, OSError, EOFError) as exc:
            raise SandboxGone(f"sandbox {sid}: cannot reach its supervisor: {exc!r}") from exc

    # --- attach, cleanup, close ---

    def _read_record(self, directory: Path) -> dict[str, Any] | None:
        try:
            data = json.loads((directory / "runtime.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _cgroup_from(self, sid: str, record: dict[str, Any] | None) -> SandboxCgroup | None:
        info = record.get("cgroup") if record else None
        if isinstance(info, dict) and isinstance(info.get("dirs"), dict):
            return SandboxCgroup(int(info.get("version", 1)), dict(info["dirs"]))
        if self._cgroups.available:
            cg = self._cgroups.sandbox(sid)
            return cg if cg.exists() else None
        return None

    def _open_process(self, record: dict[str, Any] | None) -> tuple[int, int, bool] | None:
        """(pid, pidfd, is_child) of the sandbox's bwrap if it still runs, else None."""
        if not record or record.get("boot_id") != self._boot_id:
            return None
        pid = int(record.get("pid", 0))
        if pid <= 0:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        stat = _proc_stat(pid)  # checked after pidfd_open: the fd is then the right process
        if stat is None or stat[1] != record.get("starttime"):
            os.close(pidfd)
            return None
        return pid, pidfd, stat[0] == os.getpid()

    async def attach(self, sandbox_id: str) -> SandboxHandle | MainExit:
        handle = self._handles.get(sandbox_id)
        if handle is not None and not handle._closed:
            return handle if handle.running else await handle.wait_exit()
        if not SANDBOX_ID.match(sandbox_id):
            raise SpecRefused(f"invalid sandbox id {sandbox_id!r}")
        directory = self._sandboxes / sandbox_id
        if not directory.is_dir():
            raise SandboxGone(f"sandbox {sandbox_id} has no state on this node")
        record = self._read_record(directory)
        cgroup = self._cgroup_from(sandbox_id, record)
        if record and isinstance(record.get("image_digest"), str):
            self._image_of[sandbox_id] = record["image_digest"]
        opened = self._open_process(record)
        if opened is None:
            dead = LocalSandbox(
                self, sandbox_id, directory, _ProcessWatch(0, None, False), cgroup, None
            )
            if cgroup is not None and cgroup.pids():
                await cgroup.kill_all()
            return dead._compute_exit()
        pid, pidfd, is_child = opened
        watch_live = _ProcessWatch(pid, pidfd, is_child)
        try:
            conn: SupervisorConnection | None = await self._connect(directory, sandbox_id, 5.0)
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
        handle = LocalSandbox(self, sandbox_id, directory, watch_live, cgroup, conn, ids)
        self._register(handle)
        if conn is None:
            return await handle.kill()
        return handle

    async def cleanup(self, sandbox_id: str) -> None:
        if not SANDBOX_ID.match(sandbox_id):
            raise SpecRefused(f"invalid sandbox id {sandbox_id!r}")
        directory = self._sandboxes / sandbox_id
        handle = self._handles.pop(sandbox_id, None)
        if handle is None and directory.is_dir():
            attached = await self.attach(sandbox_id)
            handle = self._handles.pop(sandbox_id, None)
            if isinstance(attached, LocalSandbox):
                handle = attached
        if handle is not None:
            if handle.running:
                await handle.kill()
            await handle._close()
            cgroup = handle.cgroup
        else:
            cgroup = self._cgroup_from(sandbox_id, self._read_record(directory))
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
        shutil.rmtree(directory, ignore_errors=True)

    async def close(self) -> None:
        handles = list(self._handles.values())
        self._handles.clear()
        self._running.clear()
        for handle in handles:
            await handle._close()


def _private_copy(binary: Path, directory: Path) -> str:
    """A copy of `binary` in `directory` (made or refreshed when it differs); its path.

    Sandboxes of a root service start as an unprivileged host uid that cannot search paths
    private to host root (a venv under /root), so the supervisor they run is taken from the
    state directory, which the launcher shows them id-mapped. A copy also keeps running
    sandboxes' binary apart from an upgrade of the package.
    """
    data = binary.read_bytes()
    target = directory / binary.name
    with contextlib.suppress(OSError):
        if target.read_bytes() == data:
            return str(target)
    private_dir(directory)
    tmp = directory / f".{binary.name}.{os.getpid()}"
    tmp.write_bytes(data)
    os.chmod(tmp, SANDBOX_BINARY_MODE)
    os.replace(tmp, target)
    return str(target)


@contextlib.contextmanager
def _short_path(path: Path) -> Any:
    """`path` as a string usable as a unix socket address (sun_path holds 107 bytes).

    Longer paths are reached through /proc/self/fd/N of their open directory.
    """
    text = str(path)
    if len(text.encode()) <= SOCKET_PATH_MAX:
        yield text
        return
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{dirfd}/{path.name}"
        if len(short) > SOCKET_PATH_MAX:
            raise PathRefused(f"socket path {text} is too long")
        yield short
    finally:
        os.close(dirfd)

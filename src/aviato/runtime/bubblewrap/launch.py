"""Starting a sandbox's host processes: launcher -> bwrap -> supervisor, with the control
socket, main log, exit file, seccomp filter and runtime log on the descriptors the supervisor
expects (docs/internals/supervisor-protocol.md), and reaching its control socket afterwards.

```
service ──posix_spawn──► aviato-supervisor --launch   (joins the cgroups: v1 by "0" into
                            │                          `tasks`, see cgroups/; v2 via
                            │                          cgroup.procs; setsid)
                            └─exec─► bwrap            (host-side monitor; stays until the end)
                                       └─► /.aviato/supervisor   PID 1 of the sandbox
```

(Until issue 19, v1 cgroups were joined by a `sh -c` in front of the launcher: one exec more,
0.6-1.7 ms of every create here.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aviato._private import DIR_MODE, MOUNTED_FILE_MODE, SANDBOX_BINARY_MODE, private_dir
from aviato.runtime import seccomp
from aviato.runtime.base import PathRefused, SandboxConfig, SandboxGone, SandboxRuntimeError
from aviato.runtime.bubblewrap.command import (
    FD_ENVIRONMENT,
    MAX_STAGED_VOLUMES,
    VOLUME_AT,
    OwnUserns,
)
from aviato.runtime.bubblewrap.zygote import Zygote
from aviato.runtime.cgroups import SandboxCgroup
from aviato.runtime.supervisor import SupervisorConnection, c_library
from aviato.runtime.supervisor.connection import failure_words
from aviato.runtime.userns import IdRange
from aviato.runtime.volume_store import VOLUME_MOUNTS
from aviato.runtime.writable_layers import Layer, WritableLayers

# Where the inherited descriptors land in the launcher, bwrap and the supervisor.
FD_CONTROL, FD_LOG, FD_EXIT, FD_SECCOMP = 3, 4, 5, 6
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the NUL
# Where a root service's launcher shows bwrap the id-mapped state directory (in a mount
# namespace of the launcher's own; on the host it stays an empty directory).
STAGE_AT = "/run/aviato/stage"
# Where it shows the volumes directory, writable (docs/volumes.md), to sandboxes that mount one.
VOLUMES_AT = "/run/aviato/volumes"
OOM_SCORE_ADJ = 500  # sandboxes go before the service when the whole host runs out of memory
LAUNCH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
# Dispositions reset to default in the launcher: an ignored signal (SIGPIPE in every Python
# process, SIGINT/SIGQUIT for a service started in the background) would stay ignored in bwrap,
# the supervisor and the sandbox's processes.
SIGDEF = tuple(
    sorted(
        int(s)
        for s in signal.valid_signals()
        if int(s) < 32 and s not in (signal.SIGKILL, signal.SIGSTOP)
    )
)


def launch_oom_adj() -> list[str]:
    # Raising oom_score_adj needs no privilege, lowering needs CAP_SYS_RESOURCE.
    try:
        current = int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        return []
    return ["--oom-score-adj", str(OOM_SCORE_ADJ)] if current < OOM_SCORE_ADJ else []


class SandboxExists(SandboxRuntimeError):
    """A sandbox of that id has state on this node already."""

    code = "ALREADY_EXISTS"


class SandboxStartFailed(SandboxRuntimeError):
    """bwrap or the supervisor failed before the supervisor said HELLO."""

    code = "INTERNAL"


def staged_launch(
    ids: IdRange,
    userns: OwnUserns,
    config: SandboxConfig,
    layers: WritableLayers | None,
    layer: Layer | None,
) -> list[str]:
    """The launcher's arguments for a sandbox in its own uid range `ids`: the range, the state
    directory staged read-only, and staged writable the volumes (when it mounts one) and its
    writable layer (when the node keeps layers on disk)."""
    launch = [*ids.launcher_args(), "--stage", f"{userns.stage_from}:{userns.stage_at}"]
    if any(m.source.startswith(userns.volumes_from + "/") for m in config.mounts):
        launch += ["--stage-volumes", f"{userns.volumes_from}:{userns.volumes_at}"]
    for source, at in userns.staged:
        launch += ["--volume", f"{source}:{at}"]
    if layers is not None:
        launch += layers.launcher_args(layer)
    if userns.volume_mounts_from and os.path.isdir(userns.volume_mounts_from):
        launch += ["--detach", userns.volume_mounts_from]
    return launch


def own_userns(state_dir: Path) -> OwnUserns:
    """How a root service's launchers stage `state_dir` (read-only), its directory volumes and
    each other volume (writable); makes the (empty) places on the host they stage at."""
    for at in (STAGE_AT, VOLUMES_AT, *(f"{VOLUME_AT}/{i}" for i in range(MAX_STAGED_VOLUMES))):
        os.makedirs(at, mode=0o755, exist_ok=True)
    return OwnUserns(str(state_dir), STAGE_AT, str(state_dir / "volumes"), VOLUMES_AT,
                     str(state_dir / VOLUME_MOUNTS))  # fmt: skip


def write_mounted_files(directory: Path, config: SandboxConfig) -> list[tuple[str, str]]:
    """Writes the config's mounted files into `directory/files/`; (sandbox path, host path) each."""
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


@dataclass(frozen=True)
class Launched:
    """A sandbox's launcher, started: its host pid, a pidfd of it, and whether it is the
    service's own child (spawned) or the zygote's (forked there: not ours to reap)."""

    pid: int
    pidfd: int
    is_child: bool


@dataclass(frozen=True)
class Launcher:
    """How this runtime starts a sandbox's host processes: `supervisor` (its `--launch` mode
    joins the cgroups and, for a root service, the user namespace), the launcher's
    `--oom-score-adj` option (`launch_oom_adj()`), and the zygote that forks launchers
    (zygote.py; None: every launcher is spawned)."""

    supervisor: str
    oom_adj: list[str]
    zygote: Zygote | None = None
    libc: str = ""  # the supervisor's C library (`c_library`)

    def spawn(
        self,
        directory: Path,
        argv: list[str],
        cgroup: SandboxCgroup | None,
        launch: list[str],
        environment: bytes,
    ) -> Launched:
        """Starts launcher → bwrap → supervisor with fds 3-6 in place (forked by the zygote,
        else spawned).

        `launch`: more options of the launcher (its user namespace). `environment`: bwrap's
        options that carry the sandbox's environment and secrets (`command.environment_args`),
        given on fd FD_ENVIRONMENT from a memory file that nothing else can open, never on a
        command line."""
        opened: list[int] = []
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with short_path(directory / "ctl.sock") as path:
                sock.bind(path)
                os.chmod(path, 0o600)
            sock.listen(64)
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
            opened.append(os.open(directory / "main.log", flags | os.O_APPEND, 0o600))
            opened.append(os.open(directory / "exit", flags | os.O_TRUNC, 0o600))
            opened.append(seccomp.filter_fd())
            opened.append(os.open(directory / "runtime.log", flags | os.O_APPEND, 0o600))
            opened.append(_memory_file(environment))
            # control socket, main log, exit file, seccomp filter, runtime log, environment
            fds = [sock.fileno(), *opened]
            launcher = [self.supervisor, "--launch", *self.oom_adj]
            if cgroup is not None and cgroup.thread_files:
                # v1: the launcher writes "0" to each `tasks` (see cgroups/: 12 ms less after an
                # idle spell than joining via cgroup.procs).
                for tasks in cgroup.thread_files:
                    launcher += ["--cgroup-tasks", tasks]
            elif cgroup is not None:
                for procs in cgroup.procs_files:
                    launcher += ["--cgroup-procs", procs]
            launcher += [*launch, "--", *argv]
            try:
                forked = None if self.zygote is None else self.zygote.launch(launcher, fds)
                if forked is not None:
                    return Launched(forked[0], forked[1], is_child=False)
                pid = self._spawn(launcher, fds)
            except OSError as exc:
                raise SandboxRuntimeError(f"cannot start {self.supervisor}: {exc}") from exc
            return Launched(pid, os.pidfd_open(pid), is_child=True)
        finally:
            sock.close()
            for fd in opened:
                os.close(fd)

    def _spawn(self, launcher: list[str], fds: list[int]) -> int:
        """posix_spawn of `launcher` with `fds` (as `spawn` lists them) at 3, 4, 5, 6, 1 and 2,
        and FD_ENVIRONMENT; stdin /dev/null. Any other descriptor this process left inheritable
        is closed by the launcher (`launcher.c`, close_from): listing ours here cost
        O(open descriptors) a create."""
        # Copies at fd >= 10 so that no dup2 below overwrites a source it still needs.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
        try:
            ctl, main_log, exit_file, filt, err, env = high
            actions: list[tuple[Any, ...]] = [
                (os.POSIX_SPAWN_DUP2, ctl, FD_CONTROL),
                (os.POSIX_SPAWN_DUP2, main_log, FD_LOG),
                (os.POSIX_SPAWN_DUP2, exit_file, FD_EXIT),
                (os.POSIX_SPAWN_DUP2, filt, FD_SECCOMP),
                (os.POSIX_SPAWN_DUP2, err, 1),
                (os.POSIX_SPAWN_DUP2, err, 2),
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, env, FD_ENVIRONMENT),
            ]
            return os.posix_spawn(self.supervisor, launcher, LAUNCH_ENV, file_actions=actions,
                                  setsigdef=SIGDEF, setsigmask=())  # fmt: skip
        finally:
            for fd in high:
                os.close(fd)

    def close(self) -> None:
        """Ends the zygote (the launchers it forked keep running)."""
        if self.zygote is not None:
            self.zygote.close()


def launcher_for(supervisor: str, *, zygote: bool | None = None) -> Launcher:
    """The runtime's launcher: `supervisor`'s, with a zygote of it when `zygote` (None: unless
    the supervisor is built against musl).

    A musl-built launcher starts in ~0.06 ms, and spawning it measured as fast as the zygote's
    round trip or faster (create -> first exec 1.03 times as long with the zygote, median of 12
    alternated rounds, docs/benchmarks.md); with glibc's start-up the zygote saves ~3 % of a
    create."""
    libc = c_library(supervisor) if supervisor else ""
    if zygote is None:
        zygote = libc != "musl"
    forks = Zygote(supervisor, LAUNCH_ENV, SIGDEF) if zygote else None
    return Launcher(supervisor, launch_oom_adj(), forks, libc)


def _memory_file(data: bytes) -> int:
    """A descriptor of an anonymous memory file holding `data`, read from its start (it has
    no path: only a process holding the descriptor, or one that may ptrace it, reads it)."""
    fd = os.memfd_create("aviato-environment", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def connect_supervisor(directory: Path, sid: str, wait: float) -> SupervisorConnection:
    """Connects to the supervisor of the sandbox with state `directory` (its ctl.sock)."""
    try:
        with short_path(directory / "ctl.sock") as path:
            return await SupervisorConnection.connect(path, wait)
    except SandboxRuntimeError:
        raise
    except (TimeoutError, OSError, EOFError) as exc:
        raise SandboxGone(
            f"sandbox {sid}: cannot reach its supervisor: {failure_words(exc)}"
        ) from exc


def private_copy(binary: Path, directory: Path) -> str:
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
def short_path(path: Path) -> Any:
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

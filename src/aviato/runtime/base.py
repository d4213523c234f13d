"""The interface between the control plane and whatever isolates sandboxes on one node.

The service never touches bubblewrap, cgroups or the supervisor directly: it asks a `Runtime` to
create a sandbox from a `SandboxConfig` and gets a `SandboxHandle` back, through which it runs
commands, moves files and learns how the main process ended. Another isolation technology (crun,
gVisor) is another implementation of these two classes.

Errors: every method raises `RuntimeError_` subclasses from this module, never OSError or
backend-specific exceptions, so that the service can map them to gRPC codes in one place.
"""

from __future__ import annotations

import abc
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

# The model of a sandbox spec and an exec request lives in `model`; re-exported here because
# every runtime and placement works against these names.
from aviato.runtime.model import ExecSpec, RegistryCredentials, SandboxConfig

__all__ = [
    "CapacityExhausted",
    "ExecEvent",
    "ExecExit",
    "ExecFailed",
    "ExecHandle",
    "ExecOutput",
    "ExecSpec",
    "FileInfo",
    "FileNotFound",
    "FileWriteDescriptor",
    "ImageInfo",
    "ImagePullProgress",
    "ImageService",
    "LimitsUnavailable",
    "LogRecord",
    "MainExit",
    "PathRefused",
    "PermissionRefused",
    "PortRefused",
    "PortUnreachable",
    "PullProgressFn",
    "RegistryCredentials",
    "Runtime",
    "SandboxConfig",
    "SandboxGone",
    "SandboxHandle",
    "SandboxRuntimeError",
    "Unsupported",
    "UsageReading",
]

from aviato.coded_errors import SandboxRuntimeError as SandboxRuntimeError


class FileNotFound(SandboxRuntimeError):
    code = "NOT_FOUND"


class PathRefused(SandboxRuntimeError):
    """A path that is malformed or not allowed (e.g. a directory where a file was expected)."""

    code = "INVALID_ARGUMENT"


class PermissionRefused(SandboxRuntimeError):
    code = "PERMISSION_DENIED"


class PortRefused(SandboxRuntimeError):
    """A port number that no server can listen on (ports are 1 to 65535)."""

    code = "INVALID_ARGUMENT"


class PortUnreachable(SandboxRuntimeError):
    """Nothing in the sandbox accepted a connection on the port (refused, or not in time)."""

    code = "UNAVAILABLE"


class SandboxGone(SandboxRuntimeError):
    """The sandbox's supervisor is no longer reachable (the sandbox ended or was killed)."""

    code = "FAILED_PRECONDITION"


class CapacityExhausted(SandboxRuntimeError):
    code = "RESOURCE_EXHAUSTED"


class LimitsUnavailable(SandboxRuntimeError):
    """The sandbox or command asks for what this host cannot give (limits without a cgroup
    delegation, a protected command without a user namespace of its own)."""

    code = "FAILED_PRECONDITION"


class Unsupported(SandboxRuntimeError):
    """An operation this runtime does not offer (e.g. images on a runtime without a store)."""

    code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class ExecOutput:
    stream: int  # 1 stdout, 2 stderr
    data: bytes


@dataclass(frozen=True)
class ExecExit:
    exit_code: int
    signal: int
    timed_out: bool
    cpu_user_seconds: float
    cpu_system_seconds: float
    peak_memory_bytes: int
    wall_seconds: float
    # Killed by the OOM killer at the sandbox's memory limit (see the runtime for how it is
    # told; False when the runtime cannot tell).
    oom_killed: bool = False


@dataclass(frozen=True)
class ExecFailed:
    """The command could not run (e.g. executable not found). Terminal."""

    code: str  # grpc.StatusCode name
    message: str


ExecEvent = ExecOutput | ExecExit | ExecFailed


class ExecHandle(abc.ABC):
    """One running command. `events()` yields output then exactly one ExecExit or ExecFailed."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[ExecEvent]: ...

    @abc.abstractmethod
    async def write_stdin(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def close_stdin(self) -> None: ...

    @abc.abstractmethod
    async def resize(self, rows: int, cols: int) -> None: ...

    @abc.abstractmethod
    async def signal(self, signo: int) -> None: ...

    @abc.abstractmethod
    async def kill(self) -> None:
        """SIGKILL the command's process group and end `events()` (used when the client goes)."""


@dataclass(frozen=True, slots=True)
class UsageReading:
    """What a whole sandbox uses now (`SandboxHandle.usage`): CPU nanoseconds so far (all of
    its processes, all of its life), memory charged now in bytes, tasks now; -1 for a figure
    the node could not read."""

    cpu_ns: int
    memory_bytes: int
    pids: int


@dataclass(frozen=True)
class MainExit:
    """How a sandbox's main process (or the whole sandbox) ended."""

    exit_code: int
    signal: int
    ended_at_ns: int
    # "" for a normal exit; "OOMKilled", "killed", "lost" (no exit record) otherwise; or what
    # ended it without the service: "max lifetime exceeded" or "lease expired" (the deadline of
    # `SandboxHandle.set_deadline`), "signal from inside: ..." (a process of the sandbox
    # signalled its init).
    reason: str = ""


@dataclass(frozen=True)
class FileInfo:
    size: int
    mode: int


@dataclass(frozen=True)
class FileEntry:
    """One entry of a sandbox's file system, as `lstat` sees it (a symlink is not followed)."""

    name: str  # the last component (a listing's entry), or the name stat was asked about
    type: str  # "file", "dir", "symlink" or "other" (device, FIFO, socket)
    size: int
    mode: int  # permission bits, 0o7777
    mtime_ns: int
    target: str = ""  # a symlink's target, as written


@dataclass(frozen=True)
class PathOp:
    """One directory or metadata operation (`SandboxHandle.path_op`).

    `rel` None: `path` is a sandbox path; its directory is resolved following ordinary symlinks
    (never /proc magic links), its last component is acted on without being followed. `rel` a
    string: `path` is a root directory and `rel` a plain relative name under it ("" the root
    itself), resolved without following any symlink below the root; what tree transfers use."""

    kind: str  # stat, list, remove, mkdir, rename, symlink, set_meta
    path: str
    rel: str | None = None
    arg: str = ""  # rename: the destination (a path, or a rel under the same root); symlink: target
    recursive: bool = False  # remove
    parents: bool = False  # mkdir: missing parents made, an existing directory is no error
    mode: int | None = None  # mkdir, set_meta
    mtime_ns: int | None = None  # set_meta
    offset: int = 0  # list: entries skipped (in the directory's own order)
    limit: int = 0  # list: entries answered at most


@dataclass(frozen=True)
class PathOpResult:
    entries: list[FileEntry]  # stat: one; list: up to its limit
    truncated: bool = False  # list: more entries follow (ask again with a larger offset)


@dataclass(frozen=True)
class LogRecord:
    """One piece of the main process's output, as the runtime recorded it."""

    stream: int  # 1 stdout, 2 stderr (0: unknown)
    time_ns: int  # unix time it was read from the process
    data: bytes


class FileWriteDescriptor(abc.ABC):
    """A write of one file of a sandbox through a descriptor (`SandboxHandle.open_for_writing`):
    `fd` is open for writing on a new, empty file that takes the target's place only at
    `commit`, or (a file kept in memory, with a declared size) the write end of a pipe whose
    bytes the sandbox's side moves into such a file; `abort` (or the end of the service) leaves
    no file behind. Both close `fd`."""

    fd: int

    @abc.abstractmethod
    async def commit(self) -> int:
        """Puts the file in place; returns its size. The errors of `write_file`."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drops the write (idempotent; nothing after `commit`)."""


class SandboxHandle(abc.ABC):
    sandbox_id: str

    @abc.abstractmethod
    async def exec(self, spec: ExecSpec) -> ExecHandle: ...

    @abc.abstractmethod
    async def read_file(self, path: str) -> tuple[FileInfo, AsyncIterator[bytes]]: ...

    @abc.abstractmethod
    async def write_file(
        self, path: str, mode: int, make_parents: bool, chunks: AsyncIterator[bytes]
    ) -> int:
        """Writes atomically (temporary file, then rename); returns the size written."""

    async def open_for_reading(self, path: str) -> tuple[int, FileInfo]:
        """The descriptor of the sandbox's regular file `path`, opened for reading as
        `read_file` opens it (the caller's to close), and its size and mode, so that the bytes
        can move in the kernel. Unsupported (the default; a file that is not regular, or whose
        size says nothing, as in /proc): the caller streams with `read_file`. Its errors."""
        raise Unsupported("this runtime hands out no file descriptors")

    async def open_for_writing(
        self, path: str, mode: int, make_parents: bool, size: int | None = None
    ) -> FileWriteDescriptor:
        """A write of `path` through a descriptor, as `write_file` writes it (atomically); with
        `size`, the bytes to come (the file is put in place only with exactly those), which a
        file kept in memory needs (its bytes go through a pipe, so that the sandbox's memory
        limit counts them). Unsupported (the default; a file kept in memory without `size`):
        the caller streams with `write_file`. Its errors, and CapacityExhausted when `size`
        is more than the sandbox's memory can hold."""
        raise Unsupported("this runtime hands out no file descriptors")

    async def path_op(self, op: PathOp) -> PathOpResult:
        """A directory or metadata operation; the errors of `read_file`."""
        raise Unsupported("directory operations are not available on this runtime")

    async def read_file_at(self, root: str, rel: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        """`read_file` of `rel` beneath the directory `root`, following no symlink below it."""
        raise Unsupported("directory transfers are not available on this runtime")

    async def write_file_at(
        self,
        root: str,
        rel: str,
        mode: int,
        mtime_ns: int | None,
        chunks: AsyncIterator[bytes],
    ) -> int:
        """`write_file` of `rel` beneath the directory `root` (missing directories made on the
        way), following no symlink below it, and giving the file `mtime_ns` when not None."""
        raise Unsupported("directory transfers are not available on this runtime")

    @abc.abstractmethod
    async def wait_exit(self) -> MainExit:
        """Resolves when the sandbox has ended (main process exit, stop or kill)."""

    @abc.abstractmethod
    async def terminate(self, grace_seconds: float) -> MainExit:
        """SIGTERM the main process; SIGKILL every process of the sandbox after the grace."""

    @abc.abstractmethod
    async def kill(self) -> MainExit:
        """SIGKILL every process of the sandbox now."""

    async def set_deadline(self, at_ns: int, why: str, grace_seconds: float) -> None:
        """Makes the sandbox end by itself at `at_ns` (unix time; 0: no deadline), even while
        the service is down: SIGTERM, then everything killed `grace_seconds` later; its exit then
        says `why` ("lifetime" or "lease"). Replaces the previous deadline. Best effort: the
        default (a runtime that cannot) does nothing, and the service's own reaper remains."""
        return None

    def usage(self) -> UsageReading | None:
        """What the sandbox uses now, read without waiting (a few kernel files on this node);
        None when it cannot be known here: the default, a runtime without cgroups, a sandbox
        on another machine, one that ended. Cheap enough to call every few seconds for
        every sandbox (the service's usage history does)."""
        return None

    async def pause(self) -> None:
        """Freezes every process of the sandbox where it is, its supervisor included, and
        returns once all are frozen: they use no CPU and see nothing of it (no signal, no
        stopped state) until `resume`. Their memory stays theirs. Calls that need the
        supervisor wait until the sandbox is resumed, so the caller must not make them
        meanwhile; `set_deadline` is kept and given at `resume`, and `terminate` and `kill`
        work (they resume it first). Idempotent. Raises SandboxGone (it ended), Unsupported
        (the node cannot freeze: the default), SandboxRuntimeError (a process would not
        freeze in time; the sandbox is left running)."""
        raise Unsupported("this node cannot pause sandboxes")

    async def resume(self) -> None:
        """Lets a paused sandbox run on from where it was. Idempotent; raises SandboxGone
        (it ended) and, by default, Unsupported."""
        raise Unsupported("this node cannot pause sandboxes")

    async def paused(self) -> bool:
        """Whether the sandbox is paused now, as the node's kernel says (so it holds after a
        restart of the service). The default: never."""
        return False

    async def connect_port(self, port: int) -> socket.socket:
        """A TCP connection to `port` on the sandbox's own loopback (127.0.0.1, or ::1), as a
        connected socket in blocking mode that the caller owns and relays bytes over; the
        sandbox's network is never joined to anything else. Raises PortRefused (not 1 to
        65535), PortUnreachable (refused: nothing listens; or no answer in time), SandboxGone.
        The default (a runtime that cannot) raises Unsupported."""
        raise Unsupported("this runtime cannot connect to ports inside its sandboxes")

    async def egress_listener(self) -> socket.socket:
        """The sandbox's egress listening socket: TCP on 127.0.0.1:PORT inside the sandbox,
        in blocking mode, owned by the caller, who accepts on it and serves each connection as
        the sandbox's HTTP(S) proxy (nothing inside the sandbox accepts on it). The same socket
        and port on every call, also after the service restarted (the sandbox keeps its own
        copy: closing the returned one does not close the port). From the first call on, or
        from the start for a sandbox whose egress is not isolated, every process the sandbox
        starts has HTTP_PROXY, HTTPS_PROXY, http_proxy and https_proxy set to
        http://127.0.0.1:PORT (and NO_PROXY, no_proxy to localhost,127.0.0.1,::1 unless its
        environment has them); processes already running keep the environment they had, and a
        program may still set its own. Raises SandboxGone, SandboxRuntimeError. The default (a
        runtime that cannot) raises Unsupported."""
        raise Unsupported("this runtime cannot give its sandboxes egress")

    async def snapshot(self, snapshot_id: str, max_bytes: int) -> SnapshotFacts:
        """Copies the sandbox's writable layer into a new snapshot of this node named
        `snapshot_id` (frozen meanwhile where the node can freeze it); it exists once this
        returns and never before. Raises SandboxGone, SandboxRuntimeError (RESOURCE_EXHAUSTED
        beyond `max_bytes` of data). The default (a runtime that cannot) raises Unsupported."""
        raise Unsupported("this runtime cannot snapshot its sandboxes")

    @abc.abstractmethod
    def logs(
        self, since_ns: int = 0, tail: int = -1, follow: bool = False
    ) -> AsyncIterator[LogRecord]:
        """The main process's output records, oldest first: those stamped at or after
        `since_ns`, of them only the last `tail` (negative: all); with `follow`, then the new
        ones as they come, ending once the sandbox has ended and its last record was given.
        How the runtime stores them is its own business."""


@dataclass(frozen=True)
class SnapshotFacts:
    """What a snapshot holds: data bytes (holes not counted), entries, entries left out."""

    size_bytes: int
    entries: int
    skipped: int


@dataclass(frozen=True)
class ImageInfo:
    """An image in a node's store."""

    names: tuple[str, ...]  # e.g. "docker.io/library/python:3.11"
    digest: str  # of the platform manifest, "sha256:..."
    size: int  # compressed layers, bytes
    pulled_ns: int
    in_use: bool = False  # a sandbox of the node uses it now
    node: str = ""  # the node holding it ("" until a placement names it)


@dataclass(frozen=True)
class ImagePullProgress:
    """One step of a pull: "resolving", "downloading" (`current`/`total` bytes of the blob
    `digest`), "cached" (a blob already stored), "unpacking" or "done"."""

    phase: str
    digest: str = ""
    current: int = 0
    total: int = 0
    message: str = ""


PullProgressFn = Callable[[ImagePullProgress], None]


class ImageService(abc.ABC):
    """The OCI image store of one node: the optional part of a `Runtime` (`Runtime.images`).

    Names are image references ("python:3.11", "registry/repo@sha256:..."); `remove` also takes
    a manifest digest. Errors are SandboxRuntimeError subclasses: NOT_FOUND for an image the
    store does not have, FAILED_PRECONDITION for one a sandbox uses, the registry's failures as
    the image errors of aviato.images.errors.
    """

    @abc.abstractmethod
    async def pull(
        self,
        image: str,
        credentials: RegistryCredentials | None = None,
        progress: PullProgressFn | None = None,
    ) -> ImageInfo:
        """Pulls `image` (always asking the registry, so a tag gets its newest image)."""

    @abc.abstractmethod
    async def list_images(self) -> list[ImageInfo]: ...

    @abc.abstractmethod
    async def remove(self, image: str) -> ImageInfo:
        """Removes one image unless a sandbox uses it."""

    @abc.abstractmethod
    async def prune(self) -> list[ImageInfo]:
        """Removes every image no sandbox uses; returns them."""


class Runtime(abc.ABC):
    """Creates and re-attaches sandboxes on one node. Its state lives under `state_dir`."""

    @property
    def images(self) -> ImageService | None:
        """The node's image store; None for a runtime that has none (only built-in images)."""
        return None

    @abc.abstractmethod
    async def create(self, config: SandboxConfig) -> SandboxHandle: ...

    def check(self, config: SandboxConfig) -> None:
        """Raises SandboxRuntimeError for a config this runtime cannot run, before it is recorded.

        Called synchronously at create time, so that a request this node can never serve (e.g.
        memory limits on a rootless host without a delegated cgroup) is refused to the caller
        instead of being accepted and then FAILED. Must be cheap: no I/O beyond memory.
        The default accepts everything (a runtime that learns of problems only in create).
        """
        return None

    @abc.abstractmethod
    async def attach(self, sandbox_id: str) -> SandboxHandle | MainExit:
        """Re-attaches to a sandbox after a service restart, or says how it ended meanwhile."""

    def keep_log(self, sandbox_id: str, into: Path) -> None:
        """Moves the main log of a sandbox whose state still exists to `into` (a file of the
        caller's, in the records of `runtime.logs`), so that `cleanup` does not remove it.
        Nothing when there is none (the default: a runtime that keeps no log)."""
        return None

    @abc.abstractmethod
    async def cleanup(self, sandbox_id: str) -> None:
        """Removes everything the sandbox left on the host (cgroups, directories). Idempotent."""

    @abc.abstractmethod
    def list_present(self) -> list[str]:
        """Ids of sandboxes that have state on this node (for reconciliation with the registry)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, str]:
        """Facts for `aviato server status`: isolation, bwrap path and origin, cgroup mode."""

    def image_ready(self, image: str) -> bool:
        """Whether `image` can be used at once (True for built-in images and cached pulls)."""
        return True

    async def prepare_image(
        self, image: str, credentials: RegistryCredentials | None = None
    ) -> None:
        """Makes `image` available on this node, pulling it when needed. Runtimes without an
        image store have nothing to do; `create` reports an unknown image."""
        return None

    def snapshot_ids(self) -> list[str]:
        """The snapshots this node holds (complete ones only; see `SandboxHandle.snapshot`)."""
        return []

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Removes a snapshot of this node (nothing if it has none of that id)."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases connections, and what the node holds for no sandbox any more (the bind
        mount under which sandboxes' layers are mounted, once none is); running sandboxes keep
        running, and what they use stays."""

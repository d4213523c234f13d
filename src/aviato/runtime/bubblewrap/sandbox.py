"""`BubblewrapSandbox`: the runtime's handle of one sandbox on this machine (exec, files, deadline,
pause and resume, terminate and kill, how it ended), over its supervisor connection, its bwrap
process and its cgroup.

Pausing freezes the sandbox's cgroup, its supervisor (the sandbox's PID 1) with the rest: the
connection to it stays open and what is sent on it waits in the kernel's socket buffers until
the thaw. The deadline is the supervisor's to enforce, so a frozen one cannot: a deadline given
while paused and without a connection (after a restart of the service) is kept here and given
at `resume`; the service's own reaper ends a paused sandbox whose lifetime or lease ran out
(`terminate` thaws it first, so that its main process gets its SIGTERM and grace)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from aviato.runtime.base import (
    CapacityExhausted,
    ExecHandle,
    ExecSpec,
    FileInfo,
    FileWriteDescriptor,
    LimitsUnavailable,
    LogRecord,
    MainExit,
    PathOp,
    PathOpResult,
    PathRefused,
    PortUnreachable,
    SandboxGone,
    SandboxHandle,
    SandboxRuntimeError,
    SnapshotFacts,
    Unsupported,
    UsageReading,
)
from aviato.runtime.bubblewrap.exit_record import main_exit
from aviato.runtime.bubblewrap.host_processes import ProcessWatch, kill_sandbox
from aviato.runtime.bubblewrap.launch import connect_supervisor, short_path
from aviato.runtime.bubblewrap.snapshots import take_snapshot
from aviato.runtime.cgroups import CgroupError, SandboxCgroup, read_usage
from aviato.runtime.logs import read_log
from aviato.runtime.snapshot_store import SnapshotStore
from aviato.runtime.supervisor import SupervisorConnection
from aviato.runtime.supervisor.egress_listen import egress_listen
from aviato.runtime.supervisor.file_descriptors import open_for_reading, open_for_writing
from aviato.runtime.supervisor.port_connect import check_port, connect_port
from aviato.runtime.userns import IdRange
from aviato.runtime.writable_layers import WritableLayers


class SandboxOwner(Protocol):
    """What a sandbox handle needs of its runtime (`BubblewrapRuntime`)."""

    @property
    def supports_protected(self) -> bool: ...

    def release_ids(self, sandbox_id: str, ids: IdRange | None) -> None: ...

    @property
    def snapshots(self) -> SnapshotStore: ...

    layers: WritableLayers | None


# A file written into a sandbox lands on its writable layer, a tmpfs whose pages count against
# the sandbox's memory limit: an upload may use the memory the sandbox has left, less this much
# (bytes still in flight to the supervisor, and room for its processes), and is refused beyond.
UPLOAD_MEMORY_MARGIN = 16 << 20
_UPLOAD_RECHECK_BYTES = 32 << 20


_MEMORY_FULL = (
    "{path}: No space left on device: the sandbox's files are kept in its memory, and its "
    "memory limit is reached (ask for more memory, or less disk)"
)


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
                raise CapacityExhausted(_MEMORY_FULL.format(path=path))
        if room is not None:
            room -= len(chunk)
        since += len(chunk)
        yield chunk


class BubblewrapSandbox(SandboxHandle):
    """A running (or finished) sandbox on this node."""

    def __init__(
        self,
        runtime: SandboxOwner,
        sandbox_id: str,
        directory: Path,
        watch: ProcessWatch,
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
        # (at_ns, why, grace) given while frozen with no connection: sent at `resume`.
        self._pending_deadline: tuple[int, str, float] | None = None

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

    def usage(self) -> UsageReading | None:
        if self._cgroup is None or not self.running:
            return None
        reading = read_usage(self._cgroup)
        if reading is None:
            return None
        return UsageReading(reading.cpu_ns, reading.memory_bytes, reading.pids)

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
                self._conn = await connect_supervisor(self._dir, self.sandbox_id, 5.0)
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

    async def path_op(self, op: PathOp) -> PathOpResult:
        conn = await self._connection()
        return await conn.path_op(op)

    async def read_file_at(self, root: str, rel: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        conn = await self._connection()
        return await conn.read_file_at(root, rel)

    async def write_file_at(
        self,
        root: str,
        rel: str,
        mode: int,
        mtime_ns: int | None,
        chunks: AsyncIterator[bytes],
    ) -> int:
        conn = await self._connection()
        if self._cgroup is not None:
            chunks = _within_memory(self._cgroup, rel, chunks)
        return await conn.write_file_at(root, rel, mode, mtime_ns, chunks)

    async def open_for_reading(self, path: str) -> tuple[int, FileInfo]:
        """Opened by the supervisor, over a control connection of its own
        (supervisor/file_descriptors.py)."""
        with short_path(await self._descriptor_socket()) as ctl:
            return await open_for_reading(ctl, path, self.sandbox_id)

    async def open_for_writing(
        self, path: str, mode: int, make_parents: bool, size: int | None = None
    ) -> FileWriteDescriptor:
        """Opened by the supervisor (supervisor/file_descriptors.py). A write into the memory
        layer with its size goes through a pipe the supervisor drains, in the sandbox's cgroups.
        As `write_file`'s stream (`_within_memory`), it must not run the memory out (the
        kernel's answer would be the OOM killer, not ENOSPC): a size the memory cannot hold is
        refused first, and the write is dropped when, while it runs, the sandbox's own processes
        take the rest (checked every 20 ms; what they take between two checks is theirs to
        answer for, as between the stream's)."""
        layers = self._runtime.layers
        layer = layers.present(self.sandbox_id) if layers is not None else None
        on_disk = layer is not None and layer.kind == "disk"
        cgroup = self._cgroup
        trouble = None
        if size is not None and not on_disk and cgroup is not None:
            headroom = cgroup.memory_headroom()
            if headroom is not None and size > headroom - UPLOAD_MEMORY_MARGIN:
                raise CapacityExhausted(_MEMORY_FULL.format(path=path))

            def trouble() -> SandboxRuntimeError | None:
                left = cgroup.memory_headroom()
                if left is not None and left < UPLOAD_MEMORY_MARGIN // 2:
                    return CapacityExhausted(_MEMORY_FULL.format(path=path))
                return None

        with short_path(await self._descriptor_socket()) as ctl:
            return await open_for_writing(
                ctl, path, mode, make_parents, on_disk, size, self.sandbox_id, trouble
            )

    async def _descriptor_socket(self) -> Path:
        """The control socket, for a request on a connection of its own; SandboxGone when the
        sandbox has ended, PathRefused while it is paused (nothing in it could answer)."""
        if not self.running:
            raise SandboxGone(f"sandbox {self.sandbox_id} has ended")
        if self._cgroup is not None and self._cgroup.frozen():
            raise PathRefused(f"sandbox {self.sandbox_id} is paused: resume it first")
        return self._dir / "ctl.sock"

    async def connect_port(self, port: int) -> socket.socket:
        """Made by the supervisor in the sandbox's network namespace, over a control connection
        of its own (supervisor/port_connect.py says why)."""
        check_port(port)
        if not self.running:
            raise SandboxGone(f"sandbox {self.sandbox_id} has ended")
        if self._cgroup is not None and self._cgroup.frozen():  # nothing in it could answer
            raise PortUnreachable(f"sandbox {self.sandbox_id} is paused")
        with short_path(self._dir / "ctl.sock") as path:
            return await connect_port(path, port, self.sandbox_id)

    async def egress_listener(self) -> socket.socket:
        """Made (once) and kept by the supervisor in the sandbox's network namespace; asked
        for over a control connection of its own (supervisor/egress_listen.py)."""
        if not self.running:
            raise SandboxGone(f"sandbox {self.sandbox_id} has ended")
        with short_path(self._dir / "ctl.sock") as path:
            return await egress_listen(path, self.sandbox_id)

    async def snapshot(self, snapshot_id: str, max_bytes: int) -> SnapshotFacts:
        if not self.running:
            raise SandboxGone(f"sandbox {self.sandbox_id} has ended")
        store = self._runtime.snapshots
        return await take_snapshot(
            store, self._dir, snapshot_id, self.pid, self._cgroup, self._ids, max_bytes
        )

    async def set_deadline(self, at_ns: int, why: str, grace_seconds: float) -> None:
        if (self._conn is None or self._conn.is_closed) and await self.paused():
            self._pending_deadline = (at_ns, why, grace_seconds)  # a frozen one cannot answer
            return
        conn = await self._connection()
        self._pending_deadline = None
        conn.set_deadline(at_ns, grace_seconds, why)

    # --- pausing ---

    def _freezer(self) -> SandboxCgroup:
        cgroup = self._cgroup
        if cgroup is None or not cgroup.has_freezer:
            raise Unsupported(
                f"sandbox {self.sandbox_id} cannot be paused: this node runs it without a cgroup "
                "freezer (its service can manage cgroups only as root or with a delegated "
                "cgroup subtree)"
            )
        if not self.running:
            raise SandboxGone(f"sandbox {self.sandbox_id} has ended")
        return cgroup

    async def pause(self) -> None:
        cgroup = self._freezer()
        try:
            await cgroup.freeze()
        except CgroupError as e:
            if not self.running:
                raise SandboxGone(f"sandbox {self.sandbox_id} has ended") from e
            raise SandboxRuntimeError(f"sandbox {self.sandbox_id} could not be paused: {e}") from e

    async def resume(self) -> None:
        cgroup = self._freezer()
        try:
            cgroup.thaw()
        except CgroupError as e:
            if not self.running:
                raise SandboxGone(f"sandbox {self.sandbox_id} has ended") from e
            raise SandboxRuntimeError(f"sandbox {self.sandbox_id} could not be resumed: {e}") from e
        pending, self._pending_deadline = self._pending_deadline, None
        if pending is not None:
            await self.set_deadline(*pending)

    async def paused(self) -> bool:
        return self.running and self._cgroup is not None and self._cgroup.frozen()

    # --- ending ---

    def _compute_exit(self) -> MainExit:
        oom_kills = self._cgroup.oom_kills if self._cgroup is not None else None
        return main_exit(self._dir, oom_kills, self._killed)

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
            self._runtime.release_ids(self.sandbox_id, self._ids)
            self._ids = None
        return self._exit

    async def wait_exit(self) -> MainExit:
        return await self._ended()

    async def terminate(self, grace_seconds: float) -> MainExit:
        if not self.running:
            return await self._ended()
        if self._cgroup is not None and self._cgroup.frozen():  # its SIGTERM needs it running
            with contextlib.suppress(CgroupError):
                self._cgroup.thaw()
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
        own = await connect_supervisor(self._dir, self.sandbox_id, 5.0)
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
        await kill_sandbox(self._watch, self._cgroup)

    async def _close(self) -> None:
        """Forgets the sandbox without stopping it (runtime shutdown)."""
        self._closed = True
        self._watch.detach()
        if self._conn is not None:
            await self._conn.close()

"""One command run by the supervisor: `SupervisorExec`, the runtime's `ExecHandle` over the
frames of its id."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import signal
from collections.abc import AsyncIterator, Callable

from aviato.runtime.base import ExecEvent, ExecExit, ExecFailed, ExecHandle, ExecOutput, SandboxGone
from aviato.runtime.supervisor import frames
from aviato.runtime.supervisor.frames import (
    F_ERROR,
    F_EXIT,
    F_KILL,
    F_RESIZE,
    F_SIGNAL,
    F_STARTED,
    F_STDERR,
    F_STDIN,
    F_STDIN_ACK,
    F_STDIN_EOF,
    F_STDOUT,
    STDIN_WINDOW,
)
from aviato.runtime.supervisor.streams import (
    DATA_CHUNK,
    LOST,
    STDIN_STEP,
    Credits,
    Stream,
    StreamOwner,
)

EXEC_ERROR_CODES = {
    errno.ENOENT: "INVALID_ARGUMENT",
    errno.ENOTDIR: "INVALID_ARGUMENT",
    errno.EINVAL: "INVALID_ARGUMENT",
    errno.E2BIG: "INVALID_ARGUMENT",
    errno.ENOEXEC: "INVALID_ARGUMENT",
    errno.ELOOP: "INVALID_ARGUMENT",
    errno.ENAMETOOLONG: "INVALID_ARGUMENT",
    errno.EISDIR: "INVALID_ARGUMENT",
    errno.EACCES: "PERMISSION_DENIED",
    errno.EPERM: "PERMISSION_DENIED",
    errno.EAGAIN: "RESOURCE_EXHAUSTED",
    errno.ENOMEM: "RESOURCE_EXHAUSTED",
    errno.EMFILE: "RESOURCE_EXHAUSTED",
    errno.ENFILE: "RESOURCE_EXHAUSTED",
}


# An OOM-kill counter (the sandbox cgroup's) and its value when the exec started.
OomProbe = tuple[Callable[[], int], int]


class SupervisorExec(Stream, ExecHandle):
    """One command started through a `SupervisorConnection`."""

    __slots__ = (
        "_conn",
        "_credits",
        "_finished",
        "_killed",
        "_q",
        "_start_waiter",
        "_stdin_closed",
        "_stdin_inflight",
        "_stdin_waiter",
        "_waiter",
        "id",
        "oom_probe",
        "pid",
    )

    def __init__(self, conn: StreamOwner, exec_id: int) -> None:
        self._conn = conn
        self.id = exec_id
        self.pid = 0  # in the sandbox's pid namespace, once started
        self._q: collections.deque[ExecEvent] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._start_waiter: asyncio.Future[None] | None = None  # made only by `started()`
        self._finished = False  # the terminal event is queued
        self._stdin_closed = False
        self._stdin_inflight = 0
        self._stdin_waiter: asyncio.Future[None] | None = None
        self._credits = Credits()
        self._killed = False  # SIGKILL or KILL sent by us: not an OOM kill
        # Set by the runtime (see `_oom_killed`): makes ExecExit.oom_killed meaningful.
        self.oom_probe: OomProbe | None = None

    # -- incoming --

    def _push(self, ev: ExecEvent) -> None:
        self._q.append(ev)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _finish(self, ev: ExecExit | ExecFailed) -> None:
        if self._finished:
            return
        self._finished = True
        self._conn._streams.pop(self.id, None)
        self._push(ev)
        self._wake_start()
        self._wake_stdin()

    def _wake_start(self) -> None:
        w = self._start_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_stdin(self) -> None:
        w = self._stdin_waiter
        if w is not None:
            self._stdin_waiter = None
            if not w.done():
                w.set_result(None)

    def _oom_killed(self, code: int, sig: int, timed_out: bool) -> bool:
        """Whether the OOM killer (most likely) ended the command: it died of SIGKILL (or its
        shell reports 137) without a timeout or a kill of ours, and the sandbox's OOM-kill
        counter moved since it started. Concurrent commands share the counter (see docs)."""
        probe = self.oom_probe
        if probe is None or timed_out or self._killed:
            return False
        if sig != signal.SIGKILL and not (sig == 0 and code == 128 + signal.SIGKILL):
            return False
        read, before = probe
        try:
            return read() > before
        except OSError:
            return False

    def _frame(self, ftype: int, view: memoryview) -> None:
        if ftype in (F_STDOUT, F_STDERR):
            data = bytes(view)
            self._credits.arrived(self._conn, len(data))
            self._push(ExecOutput(1 if ftype == F_STDOUT else 2, data))
        elif ftype == F_STDIN_ACK:
            n = frames.read_u32(view)
            self._stdin_inflight = max(0, self._stdin_inflight - n)
            if self._stdin_inflight <= STDIN_WINDOW - STDIN_STEP:
                self._wake_stdin()
        elif ftype == F_EXIT:
            ex = frames.decode_exit(view)
            if self._oom_killed(ex.exit_code, ex.signal, ex.timed_out):
                ex = dataclasses.replace(ex, oom_killed=True)
            self._finish(ex)
        elif ftype == F_STARTED:
            self.pid = frames.read_u32(view)
            self._wake_start()
        elif ftype == F_ERROR:
            err, message = frames.decode_error(view)
            self._finish(ExecFailed(EXEC_ERROR_CODES.get(err, "INTERNAL"), message))
        else:
            raise ValueError(f"unexpected frame type {ftype} for an exec")

    def _lost(self) -> None:
        self._finish(ExecFailed("UNAVAILABLE", LOST))

    # -- ExecHandle --

    async def started(self) -> int:
        """Waits until the command runs (or ended without starting); its pid in the sandbox's
        pid namespace, 0 if it never started."""
        if self.pid == 0 and not self._finished:
            if self._start_waiter is None:
                self._start_waiter = self._conn._loop.create_future()
            await asyncio.shield(self._start_waiter)
        return self.pid

    def events(self) -> AsyncIterator[ExecEvent]:
        # The handle is its own iterator: an async generator would cost the service's loop a
        # firstiter/finalizer round per exec.
        return self

    def __aiter__(self) -> SupervisorExec:
        return self

    async def __anext__(self) -> ExecEvent:
        q = self._q
        while not q:
            if self._finished:  # the terminal event was taken already
                raise StopAsyncIteration
            fut: asyncio.Future[None] = self._conn._loop.create_future()
            self._waiter = fut
            await fut
        ev = q.popleft()
        if type(ev) is ExecOutput:
            self._credits.taken(self._conn, self.id, len(ev.data), not self._finished)
        return ev

    async def write_stdin(self, data: bytes) -> None:
        """Sends bytes to the command's stdin, at most STDIN_WINDOW ahead of what the command
        has taken; a no-op once it ended or stdin was closed."""
        conn = self._conn
        view = memoryview(data)
        while view:
            # Wait for room for a whole step (or the rest): small acks do not make small frames.
            while self._stdin_inflight > STDIN_WINDOW - min(len(view), STDIN_STEP):
                if self._finished or self._stdin_closed or conn.is_closed:
                    return
                fut: asyncio.Future[None] = conn._loop.create_future()
                self._stdin_waiter = fut
                await fut
            if self._finished or self._stdin_closed or conn.is_closed:
                return
            n = min(len(view), DATA_CHUNK, STDIN_WINDOW - self._stdin_inflight)
            self._stdin_inflight += n
            conn._send(F_STDIN, self.id, view[:n])
            view = view[n:]
            try:
                await conn._drain()
            except SandboxGone:
                return

    async def close_stdin(self) -> None:
        if not (self._finished or self._stdin_closed or self._conn.is_closed):
            self._stdin_closed = True
            self._conn._send(F_STDIN_EOF, self.id, b"")
            self._wake_stdin()

    async def resize(self, rows: int, cols: int) -> None:
        if not (self._finished or self._conn.is_closed):
            self._conn._send(F_RESIZE, self.id, frames.encode_resize(rows, cols))

    async def signal(self, signo: int) -> None:
        if not (self._finished or self._conn.is_closed):
            if signo == signal.SIGKILL:
                self._killed = True
            self._conn._send(F_SIGNAL, self.id, frames.u32(signo))

    async def kill(self) -> None:
        """Kills the command and everything it started (KILL); `events()` then drops queued
        output and ends with ExecFailed("CANCELLED")."""
        if self._finished:
            return
        self._killed = True
        if not self._conn.is_closed:
            self._conn._send(F_KILL, self.id, b"")
        dropped = sum(len(ev.data) for ev in self._q if type(ev) is ExecOutput)
        self._q.clear()
        self._credits.taken(self._conn, self.id, dropped, False)
        self._finish(ExecFailed("CANCELLED", "the command was killed"))

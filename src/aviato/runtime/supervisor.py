"""The service's side of the per-sandbox supervisor (docs/internals/supervisor-protocol.md).

`supervisor_binary()` finds the compiled `aviato-supervisor`. `SupervisorConnection` is an asyncio
client for its control socket: one connection carries any number of concurrent execs and file
transfers, each identified by an id chosen here.

Flow control is per exec and per transfer, never per connection, so that one command that does
not read its stdin, or whose output nobody reads, cannot hold up the others:
- Output (STDOUT/STDERR/FILE_DATA): the supervisor sends at most `OUT_WINDOW` bytes of one id
  that this side has not credited; the consumer credits (CREDIT) what it takes off the id's
  queue. So the socket is always read, and each id queues at most about a window here.
- Stdin: at most `STDIN_WINDOW` bytes of one exec are sent and not yet acknowledged (STDIN_ACK,
  sent as the command takes them); `write_stdin` waits for acknowledgements beyond that.
- File writes go out as fast as the supervisor writes them to disk (the transport's drain).
A consumer that stops iterating an exec's `events()` or a file read therefore stalls only that
exec or read: iterate to the end, `kill()` the exec, or `aclose()` the read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import math
import os
import re
import signal
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aviato.runtime.base import (
    CapacityExhausted,
    ExecEvent,
    ExecExit,
    ExecFailed,
    ExecHandle,
    ExecOutput,
    ExecSpec,
    FileInfo,
    FileNotFound,
    PathRefused,
    PermissionRefused,
    SandboxGone,
    SandboxRuntimeError,
)

__all__ = [
    "PROTOCOL_VERSION",
    "SupervisorConnection",
    "SupervisorExec",
    "SupervisorMissing",
    "supervisor_binary",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
MAX_FRAME = 1024 * 1024 + 64  # largest value of a frame's length field
DATA_CHUNK = 1024 * 1024  # stdin / file bytes per frame
WRITE_BUFFER_HIGH = 4 << 20
OUT_WINDOW = 2 << 20  # output of one id the supervisor sends ahead of our credits
CREDIT_STEP = OUT_WINDOW // 4  # credit once this much was consumed
STDIN_WINDOW = 1 << 20  # stdin of one exec in flight, not yet acknowledged
STDIN_STEP = STDIN_WINDOW // 4  # a waiting writer resumes once this much room is free
# What one id may queue here before it is a protocol error: its window, plus what the supervisor
# drains from a finished command's pipes regardless of credit (4 MiB per stream), plus slack.
STREAM_QUEUE_MAX = OUT_WINDOW + (8 << 20) + (1 << 20)
# The receive buffer starts small (most connections carry tiny frames and there is one per
# sandbox) and grows to hold one whole frame of up to MAX_FRAME; it shrinks back when drained.
_RBUF_SMALL = 64 << 10
_RBUF_LARGE = 4 << 20

# Frame types, service -> supervisor.
_EXEC, _STDIN, _STDIN_EOF, _RESIZE, _SIGNAL = 1, 2, 3, 4, 5
_READ_FILE, _WRITE_BEGIN, _WRITE_DATA, _WRITE_END, _WRITE_ABORT = 6, 7, 8, 9, 10
_PING, _TERMINATE, _CREDIT, _DEADLINE, _KILL = 11, 12, 13, 14, 15
_ABORT = _WRITE_ABORT  # stops a read as well
# Frame types, supervisor -> service.
_HELLO, _STARTED, _STDOUT, _STDERR, _EXIT, _ERROR = 64, 65, 66, 67, 68, 69
_FILE_INFO, _FILE_DATA, _FILE_END, _WRITE_OK, _PONG, _STDIN_ACK = 70, 71, 72, 73, 74, 75

_HDR = struct.Struct("<IBI")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_II = struct.Struct("<II")
_HH = struct.Struct("<HH")
_EXEC_HEAD = struct.Struct("<IIHH")
_EXIT_BODY = struct.Struct("<iiBQQQQ")
_ERROR_HEAD = struct.Struct("<iI")
_FILE_INFO_BODY = struct.Struct("<QI")
_DEADLINE_HEAD = struct.Struct("<QI")

_LOST = "sandbox supervisor connection lost"
_WHY = re.compile(r"[a-z0-9_-]{1,31}")


class SupervisorMissing(SandboxRuntimeError):
    """The compiled supervisor is not where the package expects it."""


def supervisor_binary() -> Path:
    """The `aviato-supervisor` built with the package; `$AVIATO_SUPERVISOR` overrides it."""
    override = os.environ.get("AVIATO_SUPERVISOR")
    path = Path(override) if override else Path(__file__).parent / "_bin" / "aviato-supervisor"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise SupervisorMissing(
            f"the sandbox supervisor binary is missing or not executable: {path}. It is compiled "
            "when aviato is installed (this needs a C compiler): reinstall with "
            "`pip install --force-reinstall --no-deps aviato` or, in a checkout, `pip install -e .`"
        )
    return path


def _str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    return _U32.pack(len(b)) + b


def _strlist(items: list[str]) -> bytes:
    return _U32.pack(len(items)) + b"".join(_str(s) for s in items)


# Paths that name something a file transfer cannot use: a socket or device without a driver
# (ENXIO, ENODEV), a /proc/<pid>/mem-like file that cannot be read from offset 0 (EIO), a target
# that is a mount point such as a mounted file or /dev/null (EBUSY, EXDEV), a running binary
# (ETXTBSY). These are the caller's mistakes, reported as such rather than as INTERNAL.
_PATH_REFUSED = frozenset({
    errno.EISDIR, errno.ENOTDIR, errno.EINVAL, errno.ENAMETOOLONG, errno.ELOOP, errno.ENXIO,
    errno.ENODEV, errno.EIO, errno.EXDEV, errno.EOPNOTSUPP, errno.EFAULT,
})  # fmt: skip
_PERMISSION_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.EBUSY,
                                 errno.ETXTBSY})  # fmt: skip


def _file_error(err: int, message: str) -> SandboxRuntimeError:
    if err == errno.ENOENT:
        return FileNotFound(message)
    if err in _PERMISSION_REFUSED:
        return PermissionRefused(message)
    if err in _PATH_REFUSED:
        return PathRefused(message)
    if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CapacityExhausted(message)
    return SandboxRuntimeError(message)


_EXEC_CODES = {
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


def _parse_error(view: memoryview) -> tuple[int, str]:
    err, n = _ERROR_HEAD.unpack_from(view)
    return err, bytes(view[8 : 8 + n]).decode("utf-8", "replace")


class _Stream:
    """Something the supervisor sends frames for: an exec or a file transfer."""

    __slots__ = ()

    def _frame(self, ftype: int, view: memoryview) -> None:
        raise NotImplementedError

    def _lost(self) -> None:
        raise NotImplementedError


class _Credits:
    """The output window of one id: bytes queued here, and consumed but not yet credited."""

    __slots__ = ("held", "owed")

    def __init__(self) -> None:
        self.held = 0
        self.owed = 0

    def arrived(self, conn: SupervisorConnection, n: int) -> None:
        self.held += n
        conn._queued += n
        if self.held > STREAM_QUEUE_MAX:
            conn._protocol_error(f"an id queued {self.held} bytes, beyond its window")

    def taken(self, conn: SupervisorConnection, fid: int, n: int, live: bool) -> None:
        """`n` bytes left the queue; credited in steps while the id is `live`."""
        self.held -= n
        conn._queued -= n
        self.owed += n
        if live and self.owed >= CREDIT_STEP and not conn.is_closed:
            conn._send(_CREDIT, fid, _U32.pack(self.owed))
            self.owed = 0


# An OOM-kill counter (the sandbox cgroup's) and its value when the exec started.
OomProbe = tuple[Callable[[], int], int]


class SupervisorExec(_Stream, ExecHandle):
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

    def __init__(self, conn: SupervisorConnection, exec_id: int) -> None:
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
        self._credits = _Credits()
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
        if ftype in (_STDOUT, _STDERR):
            data = bytes(view)
            self._credits.arrived(self._conn, len(data))
            self._push(ExecOutput(ftype - 65, data))
        elif ftype == _STDIN_ACK:
            (n,) = _U32.unpack_from(view)
            self._stdin_inflight = max(0, self._stdin_inflight - n)
            if self._stdin_inflight <= STDIN_WINDOW - STDIN_STEP:
                self._wake_stdin()
        elif ftype == _EXIT:
            code, sig, timed_out, utime, stime, rss, wall = _EXIT_BODY.unpack_from(view)
            oom = self._oom_killed(code, sig, bool(timed_out))
            self._finish(
                ExecExit(code, sig, bool(timed_out), utime / 1e6, stime / 1e6, rss, wall / 1e6, oom)
            )
        elif ftype == _STARTED:
            (self.pid,) = _U32.unpack_from(view)
            self._wake_start()
        elif ftype == _ERROR:
            err, message = _parse_error(view)
            self._finish(ExecFailed(_EXEC_CODES.get(err, "INTERNAL"), message))
        else:
            raise ValueError(f"unexpected frame type {ftype} for an exec")

    def _lost(self) -> None:
        self._finish(ExecFailed("UNAVAILABLE", _LOST))

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
            conn._send(_STDIN, self.id, view[:n])
            view = view[n:]
            try:
                await conn._drain()
            except SandboxGone:
                return

    async def close_stdin(self) -> None:
        if not (self._finished or self._stdin_closed or self._conn.is_closed):
            self._stdin_closed = True
            self._conn._send(_STDIN_EOF, self.id, b"")
            self._wake_stdin()

    async def resize(self, rows: int, cols: int) -> None:
        if not (self._finished or self._conn.is_closed):
            self._conn._send(_RESIZE, self.id, _HH.pack(_clamp16(rows), _clamp16(cols)))

    async def signal(self, signo: int) -> None:
        if not (self._finished or self._conn.is_closed):
            if signo == signal.SIGKILL:
                self._killed = True
            self._conn._send(_SIGNAL, self.id, _U32.pack(signo))

    async def kill(self) -> None:
        """Kills the command and everything it started (KILL); `events()` then drops queued
        output and ends with ExecFailed("CANCELLED")."""
        if self._finished:
            return
        self._killed = True
        if not self._conn.is_closed:
            self._conn._send(_KILL, self.id, b"")
        dropped = sum(len(ev.data) for ev in self._q if type(ev) is ExecOutput)
        self._q.clear()
        self._credits.taken(self._conn, self.id, dropped, False)
        self._finish(ExecFailed("CANCELLED", "the command was killed"))


def _clamp16(v: int) -> int:
    return max(0, min(int(v), 0xFFFF))


class _FileRead(_Stream):
    """A READ_FILE in progress; iterates the file's bytes."""

    __slots__ = ("_abandoned", "_conn", "_credits", "_done", "_error", "_q", "_waiter", "id",
                 "info")  # fmt: skip

    def __init__(self, conn: SupervisorConnection, fid: int) -> None:
        self._conn = conn
        self.id = fid
        self.info: FileInfo | None = None
        self._q: collections.deque[bytes] = collections.deque()
        self._done = False  # FILE_END, ERROR or connection lost
        self._error: SandboxRuntimeError | None = None
        self._abandoned = False
        self._waiter: asyncio.Future[None] | None = None
        self._credits = _Credits()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def _wait(self) -> None:
        fut: asyncio.Future[None] = self._conn._loop.create_future()
        self._waiter = fut
        await fut

    def _end(self, error: SandboxRuntimeError | None) -> None:
        self._done = True
        self._error = error
        self._conn._streams.pop(self.id, None)
        self._wake()

    def _frame(self, ftype: int, view: memoryview) -> None:
        if ftype == _FILE_DATA:
            if not self._abandoned:
                self._credits.arrived(self._conn, len(view))
                self._q.append(bytes(view))
                self._wake()
        elif ftype == _FILE_INFO:
            size, mode = _FILE_INFO_BODY.unpack_from(view)
            self.info = FileInfo(size, mode)
            self._wake()
        elif ftype == _FILE_END:
            self._end(None)
        elif ftype == _ERROR:
            self._end(_file_error(*_parse_error(view)))
        else:
            raise ValueError(f"unexpected frame type {ftype} for a file read")

    def _lost(self) -> None:
        if not self._done:
            self._end(SandboxGone(_LOST))

    def __aiter__(self) -> _FileRead:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._q:
                data = self._q.popleft()
                self._credits.taken(self._conn, self.id, len(data), not self._done)
                return data
            if self._done:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            if self._abandoned:
                raise StopAsyncIteration
            await self._wait()

    async def aclose(self) -> None:
        """Stops reading: the supervisor stops sending, what it sent already is dropped."""
        self._abandon()

    def _abandon(self) -> None:
        if not self._abandoned:
            self._abandoned = True
            self._credits.taken(self._conn, self.id, sum(len(b) for b in self._q), False)
            self._q.clear()
            if not self._done:
                self._end(None)
                if not self._conn.is_closed:
                    self._conn._send(_ABORT, self.id, b"")

    def __del__(self) -> None:
        if not (self._abandoned or self._conn.is_closed):
            self._abandon()


class _FileWrite(_Stream):
    __slots__ = ("_conn", "done", "error", "id", "written")

    def __init__(self, conn: SupervisorConnection, fid: int) -> None:
        self._conn = conn
        self.id = fid
        self.done: asyncio.Future[None] = conn._loop.create_future()
        self.error: SandboxRuntimeError | None = None
        self.written = 0

    def _end(self, error: SandboxRuntimeError | None) -> None:
        self._conn._streams.pop(self.id, None)
        self.error = error
        if not self.done.done():
            self.done.set_result(None)

    def _frame(self, ftype: int, view: memoryview) -> None:
        if ftype == _WRITE_OK:
            (self.written,) = _U64.unpack_from(view)
            self._end(None)
        elif ftype == _ERROR:
            self._end(_file_error(*_parse_error(view)))
        else:
            raise ValueError(f"unexpected frame type {ftype} for a file write")

    def _lost(self) -> None:
        self._end(SandboxGone(_LOST))


class SupervisorConnection(asyncio.BufferedProtocol):
    """A connection to one sandbox's supervisor. Create with `await SupervisorConnection.connect()`.

    `closed` is an asyncio.Event set when the connection has ended (supervisor gone or `close()`).
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._hello: asyncio.Future[None] = self._loop.create_future()
        self._pings: collections.deque[asyncio.Future[None]] = collections.deque()
        self._rbuf = bytearray(_RBUF_SMALL)
        self._rview = memoryview(self._rbuf)
        self._rneed = 0  # bytes of the incomplete frame at _rstart, once its header is known
        self._rstart = 0
        self._rend = 0
        self._queued = 0  # received output bytes not yet consumed (all ids; for observation)
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.closed = asyncio.Event()
        self.supervisor_pid = 0
        self.protocol_version = 0

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str],
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> SupervisorConnection:
        """Connects to a supervisor's control socket and waits for its HELLO."""
        loop = asyncio.get_running_loop()
        conn: SupervisorConnection | None = None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_unix_connection(cls, os.fspath(path))
                await conn._hello
        except (OSError, TimeoutError, SandboxGone) as e:
            if conn is not None:
                conn.abort()
            raise SandboxGone(f"cannot reach the sandbox supervisor at {path}: {e!r}") from e
        except BaseException:
            if conn is not None:
                conn.abort()
            raise
        if conn.protocol_version != PROTOCOL_VERSION:
            conn.abort()
            raise SandboxRuntimeError(
                f"the sandbox supervisor at {path} speaks protocol {conn.protocol_version}, "
                f"this service speaks {PROTOCOL_VERSION}"
            )
        return conn

    # -- public API --

    @property
    def is_closed(self) -> bool:
        return self.closed.is_set()

    async def exec(self, spec: ExecSpec) -> SupervisorExec:
        """Sends a command to the supervisor and returns its handle without waiting for it to
        start: stdin, signals and kills may follow at once (the supervisor handles frames in
        order, and creates the exec while it handles EXEC). A command that cannot start ends
        `events()` with an ExecFailed. Raises SandboxGone if the connection is already closed."""
        self._check_open()
        h = SupervisorExec(self, self._new_id())
        flags = (1 if spec.stdin else 0) | (2 if spec.tty else 0) | (4 if spec.protected else 0)
        timeout_ms = 0
        if spec.timeout_seconds > 0:
            timeout_ms = min(max(1, math.ceil(spec.timeout_seconds * 1000)), 0xFFFFFFFF)
        env = [f"{k}={v}" for k, v in spec.env.items()]
        payload = b"".join(
            (
                _EXEC_HEAD.pack(flags, timeout_ms, _clamp16(spec.rows), _clamp16(spec.cols)),
                _str(spec.cwd),
                _strlist(list(spec.argv)),
                _strlist(env),
            )
        )
        if len(payload) > MAX_FRAME - 5:
            h._finish(ExecFailed("INVALID_ARGUMENT", "command line and environment are too large"))
            return h
        self._streams[h.id] = h
        self._send(_EXEC, h.id, payload)
        return h

    async def read_file(self, path: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        """Opens a regular file in the sandbox. Raises FileNotFound, PathRefused (directory, not
        a regular file), PermissionRefused, SandboxGone."""
        self._check_open()
        r = _FileRead(self, self._new_id())
        self._streams[r.id] = r
        self._send(_READ_FILE, r.id, _str(path))
        try:
            while r.info is None and not r._done:
                await r._wait()
        except BaseException:
            r._abandon()
            raise
        if r.info is None:
            assert r._error is not None
            raise r._error
        return r.info, r

    async def write_file(
        self, path: str, mode: int, make_parents: bool, chunks: AsyncIterator[bytes]
    ) -> int:
        """Writes a file atomically (temporary file + rename). Returns the size written. If
        `chunks` raises or the caller is cancelled, the write is aborted and leaves no file."""
        self._check_open()
        w = _FileWrite(self, self._new_id())
        self._streams[w.id] = w
        self._send(
            _WRITE_BEGIN, w.id, _II.pack(mode & 0o7777, 1 if make_parents else 0) + _str(path)
        )
        ok = False
        try:
            it = aiter(chunks)
            while not w.done.done():
                # Wait for the next chunk, but stop at once if the write ends meanwhile (refused,
                # or the connection is lost) instead of waiting for a slow producer.
                nxt: asyncio.Future[bytes] = asyncio.ensure_future(anext(it))
                if not nxt.done():
                    try:
                        await asyncio.wait((nxt, w.done), return_when=asyncio.FIRST_COMPLETED)
                    except BaseException:
                        nxt.cancel()
                        raise
                if not nxt.done():
                    nxt.cancel()
                    with contextlib.suppress(BaseException):
                        await nxt
                    break
                try:
                    chunk = nxt.result()
                except StopAsyncIteration:
                    break
                view = memoryview(chunk)
                for i in range(0, len(view), DATA_CHUNK):
                    if w.done.done():
                        break
                    self._send(_WRITE_DATA, w.id, view[i : i + DATA_CHUNK])
                    await self._drain()
            if not w.done.done():
                self._send(_WRITE_END, w.id, b"")
            await w.done
            if w.error is not None:
                raise w.error
            ok = True
            return w.written
        finally:
            if not ok and not w.done.done():
                self._streams.pop(w.id, None)
                if not self.is_closed:
                    self._send(_WRITE_ABORT, w.id, b"")

    async def ping(self) -> None:
        self._check_open()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pings.append(fut)
        self._send(_PING, 0, b"")
        await fut

    async def terminate(self, signo: int = signal.SIGTERM) -> None:
        """Signals the main process group (with --keepalive: makes the supervisor exit 0)."""
        self._check_open()
        self._send(_TERMINATE, 0, _U32.pack(signo))

    def set_deadline(self, at_ns: int, grace_seconds: float, why: str) -> None:
        """Tells the supervisor when the sandbox must end without us (0: never): at `at_ns`
        (unix time) it sends the main process SIGTERM and `grace_seconds` later it exits,
        recording `why` (lowercase letters, digits, '-', '_') in the exit file."""
        if not _WHY.fullmatch(why):
            raise ValueError(f"invalid deadline reason {why!r}")
        self._check_open()
        grace_ms = min(max(0, math.ceil(grace_seconds * 1000)), 0xFFFFFFFF)
        self._send(_DEADLINE, 0, _DEADLINE_HEAD.pack(max(0, at_ns), grace_ms) + _str(why))

    @property
    def write_backlog(self) -> int:
        """Bytes written to the connection that the supervisor has not taken yet."""
        t = self._transport
        return t.get_write_buffer_size() if t is not None and not self.is_closed else 0

    async def close(self) -> None:
        """Closes the connection (the supervisor kills this connection's running execs)."""
        if self._transport is not None:
            self._transport.close()
        await self.closed.wait()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- internals --

    def _check_open(self) -> None:
        if self.is_closed or self._transport is None:
            raise SandboxGone(_LOST)

    def _new_id(self) -> int:
        while True:
            i = self._next_id
            self._next_id = i + 1 if i < 0xFFFFFFFF else 1
            if i not in self._streams:
                return i

    def _send(self, ftype: int, fid: int, payload: bytes | memoryview) -> None:
        t = self._transport
        if t is None or self.is_closed:
            raise SandboxGone(_LOST)
        t.write(_HDR.pack(5 + len(payload), ftype, fid) + payload)

    async def _drain(self) -> None:
        if self._write_paused and not self.is_closed:
            fut: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(fut)
            await fut
        if self.is_closed:
            raise SandboxGone(_LOST)

    def _protocol_error(self, why: str) -> None:
        log.error("supervisor protocol error: %s; closing the connection", why)
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.BufferedProtocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # Room for a few 1 MiB data frames in flight (the default 64 KiB halves file writes).
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_HIGH // 4)

    def get_buffer(self, sizehint: int) -> memoryview:
        start, end = self._rstart, self._rend
        size = len(self._rbuf)
        if start == end:
            self._rstart = self._rend = end = 0
            if size > _RBUF_SMALL:
                self._resize(_RBUF_SMALL, 0, 0)
            return self._rview
        n = end - start
        want = max(self._rneed, n + 4096)  # the pending frame must fit whole
        if want > size:
            self._resize(max(_RBUF_LARGE, want), start, end)
        elif size - end < max(want - n, size // 4):
            self._rbuf[0:n] = self._rbuf[start:end]  # same size: allowed despite our memoryview
        else:
            return self._rview[end:]
        self._rstart = 0
        self._rend = n
        return self._rview[n:]

    def _resize(self, size: int, start: int, end: int) -> None:
        buf = bytearray(size)
        buf[0 : end - start] = self._rview[start:end]
        self._rbuf = buf
        self._rview = memoryview(buf)

    def buffer_updated(self, nbytes: int) -> None:
        self._rend += nbytes
        buf, view, streams = self._rbuf, self._rview, self._streams
        pos, end = self._rstart, self._rend
        unpack = _HDR.unpack_from
        try:
            while end - pos >= 9:
                length, ftype, fid = unpack(buf, pos)
                if length < 5 or length > MAX_FRAME:
                    return self._protocol_error(f"bad frame length {length}")
                fend = pos + 4 + length
                if fend > end:
                    self._rneed = 4 + length
                    break
                body = view[pos + 9 : fend]
                pos = fend
                if fid:
                    s = streams.get(fid)
                    if s is not None:
                        s._frame(ftype, body)
                elif ftype == _PONG:
                    if self._pings:
                        fut = self._pings.popleft()
                        if not fut.done():
                            fut.set_result(None)
                elif ftype == _HELLO:
                    self.protocol_version, self.supervisor_pid = _II.unpack_from(body)
                    if not self._hello.done():
                        self._hello.set_result(None)
                else:
                    return self._protocol_error(f"unexpected frame type {ftype} for id 0")
        except (struct.error, ValueError) as e:
            return self._protocol_error(str(e))
        else:
            if end - pos < 9:
                self._rneed = 0
        finally:
            self._rstart = pos

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        for s in list(self._streams.values()):
            s._lost()
        self._streams.clear()
        gone = SandboxGone(_LOST)
        for fut in [self._hello, *self._pings, *self._drain_waiters]:
            if not fut.done():
                fut.set_exception(gone)
                fut.exception()  # retrieved: no "never retrieved" warning if nobody awaits
        self._pings.clear()
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return (
            f"<SupervisorConnection pid={self.supervisor_pid} {state} streams={len(self._streams)}>"
        )

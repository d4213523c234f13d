"""`SupervisorConnection`: the service's asyncio client for one sandbox's supervisor
(docs/internals/supervisor-protocol.md). One connection carries any number of concurrent execs
and file transfers, each identified by an id chosen here; flow control is per id (streams.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import re
import signal
import struct
from collections.abc import AsyncIterator

from aviato.runtime.base import (
    ExecFailed,
    ExecSpec,
    FileInfo,
    PathOp,
    PathOpResult,
    SandboxGone,
    SandboxRuntimeError,
)
from aviato.runtime.supervisor import frames
from aviato.runtime.supervisor.exec_handle import SupervisorExec
from aviato.runtime.supervisor.file_transfers import FileRead, FileWrite, PathCall
from aviato.runtime.supervisor.frames import (
    EXEC_PROTECTED,
    EXEC_STDIN,
    EXEC_TTY,
    F_DEADLINE,
    F_EXEC,
    F_FS_OP,
    F_HELLO,
    F_PING,
    F_PONG,
    F_READ_AT,
    F_READ_FILE,
    F_TERMINATE,
    F_WRITE_ABORT,
    F_WRITE_AT,
    F_WRITE_BEGIN,
    F_WRITE_DATA,
    F_WRITE_END,
    HDR,
    MAX_FRAME,
    PROTOCOL_VERSION,
    WRITE_MAKE_PARENTS,
)
from aviato.runtime.supervisor.streams import DATA_CHUNK, LOST, Stream

log = logging.getLogger(__name__)

WRITE_BUFFER_HIGH = 4 << 20
# The receive buffer starts small (most connections carry tiny frames and there is one per
# sandbox) and grows to hold one whole frame of up to MAX_FRAME; it shrinks back when drained.
_RBUF_SMALL = 64 << 10
_RBUF_LARGE = 4 << 20
_WHY = re.compile(r"[a-z0-9_-]{1,31}")


def failure_words(exc: BaseException) -> str:
    """Why a connection failed, in words for a message (never a Python repr)."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
    if isinstance(exc, EOFError):
        return "the connection closed"
    return str(exc) or type(exc).__name__


class SupervisorConnection(asyncio.BufferedProtocol):
    """A connection to one sandbox's supervisor. Create with `await SupervisorConnection.connect()`.

    `closed` is an asyncio.Event set when the connection has ended (supervisor gone or `close()`).
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, Stream] = {}
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
            raise SandboxGone(f"cannot reach the sandbox's supervisor: {failure_words(e)}") from e
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
        flags = (
            (EXEC_STDIN if spec.stdin else 0)
            | (EXEC_TTY if spec.tty else 0)
            | (EXEC_PROTECTED if spec.protected else 0)
        )
        timeout_ms = 0
        if spec.timeout_seconds > 0:
            timeout_ms = min(max(1, math.ceil(spec.timeout_seconds * 1000)), 0xFFFFFFFF)
        env = [f"{k}={v}" for k, v in spec.env.items()]
        payload = frames.encode_exec(
            flags, timeout_ms, spec.rows, spec.cols, spec.cwd, list(spec.argv), env
        )
        if len(payload) > MAX_FRAME - 5:
            h._finish(ExecFailed("INVALID_ARGUMENT", "command line and environment are too large"))
            return h
        self._streams[h.id] = h
        self._send(F_EXEC, h.id, payload)
        return h

    async def read_file(self, path: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        """Opens a regular file in the sandbox. Raises FileNotFound, PathRefused (directory, not
        a regular file), PermissionRefused, SandboxGone."""
        return await self._read(F_READ_FILE, frames.encode_str(path))

    async def _read(self, ftype: int, payload: bytes) -> tuple[FileInfo, AsyncIterator[bytes]]:
        self._check_open()
        r = FileRead(self, self._new_id())
        self._streams[r.id] = r
        self._send(ftype, r.id, payload)
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
        flags = WRITE_MAKE_PARENTS if make_parents else 0
        return await self._write(
            F_WRITE_BEGIN, frames.encode_write_begin(mode, flags, path), chunks
        )

    async def write_file_at(
        self, root: str, rel: str, mode: int, mtime_ns: int | None, chunks: AsyncIterator[bytes]
    ) -> int:
        """`write_file` of `rel` beneath `root`, following no symlink below it (WRITE_AT)."""
        payload = frames.encode_write_at(mode, WRITE_MAKE_PARENTS, mtime_ns, root, rel)
        return await self._write(F_WRITE_AT, payload, chunks)

    async def read_file_at(self, root: str, rel: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        """`read_file` of `rel` beneath `root`, following no symlink below it (READ_AT)."""
        return await self._read(F_READ_AT, frames.encode_read_at(root, rel))

    async def path_op(self, op: PathOp) -> PathOpResult:
        """A directory or metadata operation (FS_OP)."""
        self._check_open()
        call = PathCall(self, self._new_id())
        self._streams[call.id] = call
        self._send(F_FS_OP, call.id, frames.encode_fs_op(op))
        try:
            await call.done
        finally:
            self._streams.pop(call.id, None)
        if call.error is not None:
            raise call.error
        return PathOpResult(call.entries, call.truncated)

    async def _write(self, ftype: int, payload: bytes, chunks: AsyncIterator[bytes]) -> int:
        self._check_open()
        w = FileWrite(self, self._new_id())
        self._streams[w.id] = w
        self._send(ftype, w.id, payload)
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
                    self._send(F_WRITE_DATA, w.id, view[i : i + DATA_CHUNK])
                    await self._drain()
            if not w.done.done():
                self._send(F_WRITE_END, w.id, b"")
            await w.done
            if w.error is not None:
                raise w.error
            ok = True
            return w.written
        finally:
            if not ok and not w.done.done():
                self._streams.pop(w.id, None)
                if not self.is_closed:
                    self._send(F_WRITE_ABORT, w.id, b"")

    async def ping(self) -> None:
        self._check_open()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pings.append(fut)
        self._send(F_PING, 0, b"")
        await fut

    async def terminate(self, signo: int = signal.SIGTERM) -> None:
        """Signals the main process group (with --keepalive: makes the supervisor exit 0)."""
        self._check_open()
        self._send(F_TERMINATE, 0, frames.u32(signo))

    def set_deadline(self, at_ns: int, grace_seconds: float, why: str) -> None:
        """Tells the supervisor when the sandbox must end without us (0: never): at `at_ns`
        (unix time) it sends the main process SIGTERM and `grace_seconds` later it exits,
        recording `why` (lowercase letters, digits, '-', '_') in the exit file."""
        if not _WHY.fullmatch(why):
            raise ValueError(f"invalid deadline reason {why!r}")
        self._check_open()
        grace_ms = min(max(0, math.ceil(grace_seconds * 1000)), 0xFFFFFFFF)
        self._send(F_DEADLINE, 0, frames.encode_deadline(max(0, at_ns), grace_ms, why))

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
            raise SandboxGone(LOST)

    def _new_id(self) -> int:
        while True:
            i = self._next_id
            self._next_id = i + 1 if i < 0xFFFFFFFF else 1
            if i not in self._streams:
                return i

    def _send(self, ftype: int, fid: int, payload: bytes | memoryview) -> None:
        t = self._transport
        if t is None or self.is_closed:
            raise SandboxGone(LOST)
        t.write(frames.header(ftype, fid, len(payload)) + payload)

    async def _drain(self) -> None:
        if self._write_paused and not self.is_closed:
            fut: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(fut)
            await fut
        if self.is_closed:
            raise SandboxGone(LOST)

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
        unpack = frames.unpack_header
        try:
            while end - pos >= HDR:
                length, ftype, fid = unpack(buf, pos)
                if length < 5 or length > MAX_FRAME:
                    return self._protocol_error(f"bad frame length {length}")
                fend = pos + 4 + length
                if fend > end:
                    self._rneed = 4 + length
                    break
                body = view[pos + HDR : fend]
                pos = fend
                if fid:
                    s = streams.get(fid)
                    if s is not None:
                        s._frame(ftype, body)
                elif ftype == F_PONG:
                    if self._pings:
                        fut = self._pings.popleft()
                        if not fut.done():
                            fut.set_result(None)
                elif ftype == F_HELLO:
                    self.protocol_version, self.supervisor_pid = frames.decode_hello(body)
                    if not self._hello.done():
                        self._hello.set_result(None)
                else:
                    return self._protocol_error(f"unexpected frame type {ftype} for id 0")
        except (struct.error, ValueError) as e:
            return self._protocol_error(str(e))
        else:
            if end - pos < HDR:
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
        gone = SandboxGone(LOST)
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

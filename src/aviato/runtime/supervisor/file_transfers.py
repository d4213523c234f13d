"""File transfers through the supervisor: a READ_FILE (`FileRead`, an async iterator of the
file's bytes within its output window), a WRITE_BEGIN..END (`FileWrite`), a directory or
metadata operation (`PathCall`, FS_OP), and how their errors map to the runtime's exceptions."""

from __future__ import annotations

import asyncio
import collections
import errno

from aviato.runtime.base import (
    CapacityExhausted,
    FileEntry,
    FileInfo,
    FileNotFound,
    PathRefused,
    PermissionRefused,
    SandboxGone,
    SandboxRuntimeError,
)
from aviato.runtime.supervisor import frames
from aviato.runtime.supervisor.frames import (
    F_ERROR,
    F_FILE_DATA,
    F_FILE_END,
    F_FILE_INFO,
    F_FS_DONE,
    F_FS_ENTRIES,
    F_WRITE_ABORT,
    F_WRITE_OK,
)
from aviato.runtime.supervisor.streams import LOST, Credits, Stream, StreamOwner

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


def file_error(err: int, message: str) -> SandboxRuntimeError:
    if err == errno.ENOENT:
        return FileNotFound(message)
    if err in _PERMISSION_REFUSED:
        return PermissionRefused(message)
    if err in _PATH_REFUSED:
        return PathRefused(message)
    if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CapacityExhausted(message)
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        return PathRefused(message)
    return SandboxRuntimeError(message)


class FileRead(Stream):
    """A READ_FILE in progress; iterates the file's bytes."""

    __slots__ = ("_abandoned", "_conn", "_credits", "_done", "_error", "_q", "_waiter", "id",
                 "info")  # fmt: skip

    def __init__(self, conn: StreamOwner, fid: int) -> None:
        self._conn = conn
        self.id = fid
        self.info: FileInfo | None = None
        self._q: collections.deque[bytes] = collections.deque()
        self._done = False  # FILE_END, ERROR or connection lost
        self._error: SandboxRuntimeError | None = None
        self._abandoned = False
        self._waiter: asyncio.Future[None] | None = None
        self._credits = Credits()

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
        if ftype == F_FILE_DATA:
            if not self._abandoned:
                self._credits.arrived(self._conn, len(view))
                self._q.append(bytes(view))
                self._wake()
        elif ftype == F_FILE_INFO:
            size, mode = frames.decode_file_info(view)
            self.info = FileInfo(size, mode)
            self._wake()
        elif ftype == F_FILE_END:
            self._end(None)
        elif ftype == F_ERROR:
            self._end(file_error(*frames.decode_error(view)))
        else:
            raise ValueError(f"unexpected frame type {ftype} for a file read")

    def _lost(self) -> None:
        if not self._done:
            self._end(SandboxGone(LOST))

    def __aiter__(self) -> FileRead:
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
                    self._conn._send(F_WRITE_ABORT, self.id, b"")

    def __del__(self) -> None:
        if not (self._abandoned or self._conn.is_closed):
            self._abandon()


class FileWrite(Stream):
    __slots__ = ("_conn", "done", "error", "id", "written")

    def __init__(self, conn: StreamOwner, fid: int) -> None:
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
        if ftype == F_WRITE_OK:
            self.written = frames.read_u64(view)
            self._end(None)
        elif ftype == F_ERROR:
            self._end(file_error(*frames.decode_error(view)))
        else:
            raise ValueError(f"unexpected frame type {ftype} for a file write")

    def _lost(self) -> None:
        self._end(SandboxGone(LOST))


class PathCall(Stream):
    """An FS_OP in progress: its entries (STAT, LIST), then FS_DONE or ERROR. A LIST answers at
    most FS_LIST_MAX entries, so what it gathers here is bounded."""

    __slots__ = ("_conn", "done", "entries", "error", "id", "truncated")

    def __init__(self, conn: StreamOwner, fid: int) -> None:
        self._conn = conn
        self.id = fid
        self.done: asyncio.Future[None] = conn._loop.create_future()
        self.entries: list[FileEntry] = []
        self.error: SandboxRuntimeError | None = None
        self.truncated = False

    def _end(self, error: SandboxRuntimeError | None) -> None:
        self._conn._streams.pop(self.id, None)
        self.error = error
        if not self.done.done():
            self.done.set_result(None)

    def _frame(self, ftype: int, view: memoryview) -> None:
        if ftype == F_FS_ENTRIES:
            if len(self.entries) > frames.FS_LIST_MAX:
                raise ValueError("more entries than a listing answers")
            frames.decode_entries(view, self.entries)
        elif ftype == F_FS_DONE:
            self.truncated = bool(view[0]) if len(view) else False
            self._end(None)
        elif ftype == F_ERROR:
            self._end(file_error(*frames.decode_error(view)))
        else:
            raise ValueError(f"unexpected frame type {ftype} for a file operation")

    def _lost(self) -> None:
        self._end(SandboxGone(LOST))

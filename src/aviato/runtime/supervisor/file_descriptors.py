"""Files by descriptor (OPEN_FILE): the supervisor opens a file of the sandbox as READ_FILE or
WRITE_BEGIN would (resolved inside the sandbox, never through a /proc magic link; a write goes
to a temporary file renamed into place at the end) and hands its descriptor over, so that the
bytes move in the kernel (copy_file_range, sendfile, splice) instead of through the control
connection and the service's Python.

Each open uses a control connection of its own (descriptor_request.py). A write keeps it until
`commit` (WRITE_END, answered with the size) or `abort`: when it closes first (the service or
its caller went away mid-write) the supervisor removes the temporary file, so no partial file
is ever in place.

Bytes written through a file's descriptor are charged to the memory of whoever writes them (a
local client the service passes it to), not to the sandbox's. On disk that is page cache, and
the layer's size bounds the file. A file kept in memory (tmpfs, or the memory layer's overlay)
must count against the sandbox's memory limit, so for a write whose size is declared the
supervisor hands out the write end of a pipe instead (OPEN_THROUGH_PIPE) and moves the bytes
into the file itself, in the sandbox's cgroups; it renames the file only when exactly the
declared bytes arrived. Without a declared size such a write is refused, and streamed through
the supervisor (`write_file`) as before. What the supervisor hands out is checked here: a
regular file or a pipe's write end, open for writing, and a pipe only when one was asked for.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
from collections.abc import Callable

from aviato.runtime.base import FileInfo, FileWriteDescriptor, SandboxRuntimeError, Unsupported
from aviato.runtime.supervisor import frames
from aviato.runtime.supervisor.descriptor_request import REQUEST_ID, DescriptorExchange
from aviato.runtime.supervisor.file_transfers import file_error
from aviato.runtime.supervisor.frames import (
    F_FILE_OPENED,
    F_OPEN_FILE,
    F_WRITE_END,
    F_WRITE_OK,
    OPEN_FOR_WRITE,
    OPEN_LAYER_ON_DISK,
    OPEN_MAKE_PARENTS,
    OPEN_THROUGH_PIPE,
)

__all__ = ["open_for_reading", "open_for_writing"]

ANSWER_SECONDS = 30.0  # an open, or a rename at the end (the supervisor answers in microseconds)
WATCH_SECONDS = 0.02  # how often an open pipe's write asks whether to go on (`trouble`)
_TOO_OLD = "a supervisor started before this service's version cannot hand out files"


def _request(flags: int, mode: int, path: str, size: int = 0) -> bytes:
    body = frames.encode_open_file(flags, mode, path, size)
    return frames.header(F_OPEN_FILE, REQUEST_ID, len(body)) + body


def _read_refusal(code: int, message: str) -> SandboxRuntimeError:
    """EINVAL: a file to stream instead (read: not a regular file whose size means something;
    write: kept in memory, or the path is invalid, which the stream then says)."""
    if code == errno.EINVAL:
        return Unsupported(message)
    return file_error(code, message)


async def open_for_reading(ctl_path: str, path: str, sandbox: str) -> tuple[int, FileInfo]:
    """The sandbox's regular file `path`, opened for reading: (descriptor, its size and mode).
    The descriptor is the caller's to close. Unsupported: a file to stream instead (not a
    regular file, or one whose size says nothing, as in /proc); the errors of `read_file`."""
    exchange = DescriptorExchange(ctl_path, sandbox, _read_refusal)
    try:
        fd, body = await exchange.request(
            _request(0, 0, path),
            F_FILE_OPENED,
            what="a file to read",
            answer_within=ANSWER_SECONDS,
            too_old=_TOO_OLD,
        )
    finally:
        exchange.close()
    size, mode = frames.decode_file_info(memoryview(body))
    return fd, FileInfo(size=size, mode=mode)


class _SupervisorWrite(FileWriteDescriptor):
    def __init__(
        self,
        exchange: DescriptorExchange,
        fd: int,
        path: str,
        trouble: Callable[[], SandboxRuntimeError | None] | None,
    ) -> None:
        self._exchange = exchange
        self.fd = fd
        self._path = path
        self._done = False
        self._failure: SandboxRuntimeError | None = None
        self._watch = None if trouble is None else asyncio.create_task(self._watching(trouble))

    async def _watching(self, trouble: Callable[[], SandboxRuntimeError | None]) -> None:
        """Asks `trouble` every WATCH_SECONDS until the write ends; on an answer the write is
        dropped (the supervisor closes its pipe: the writer's next write breaks) and `commit`
        raises it."""
        while True:
            failure = trouble()
            if failure is not None:
                self._failure = failure
                self._exchange.close()
                return
            await asyncio.sleep(WATCH_SECONDS)

    def _stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    async def commit(self) -> int:
        if self._done:
            raise SandboxRuntimeError(f"{self._path}: this write has already ended")
        self._done = True
        self._stop_watching()
        os.close(self.fd)
        if self._failure is not None:
            raise self._failure
        try:
            body = await self._exchange.send_and_wait(
                frames.header(F_WRITE_END, REQUEST_ID, 0),
                F_WRITE_OK,
                what="the end of a write",
                answer_within=ANSWER_SECONDS,
            )
        finally:
            self._exchange.close()
        return int.from_bytes(body[:8], "little")

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._stop_watching()
            os.close(self.fd)
            self._exchange.close()


async def open_for_writing(
    ctl_path: str,
    path: str,
    mode: int,
    make_parents: bool,
    layer_on_disk: bool,
    size: int | None,
    sandbox: str,
    trouble: Callable[[], SandboxRuntimeError | None] | None = None,
) -> FileWriteDescriptor:
    """A new write of the sandbox's file `path` (see FileWriteDescriptor); the errors of
    `write_file`. With `size` (the bytes to come) a file kept in memory is written through a
    pipe (its `fd` is then the pipe's write end) and the file is put in place only with exactly
    `size` bytes; without it, Unsupported for such a file (its bytes must be written by the
    supervisor, which the sandbox's memory limit counts: the module docstring). An overlay
    root counts as on disk only with `layer_on_disk`. `trouble`, asked every WATCH_SECONDS
    while a pipe's write is open, ends it with the error it returns (a memory about to run
    out)."""
    exchange = DescriptorExchange(ctl_path, sandbox, _read_refusal)
    flags = OPEN_FOR_WRITE | (OPEN_MAKE_PARENTS if make_parents else 0)
    flags |= OPEN_LAYER_ON_DISK if layer_on_disk else 0
    flags |= OPEN_THROUGH_PIPE if size is not None else 0
    try:
        fd, _ = await exchange.request(
            _request(flags, mode, path, size or 0),
            F_FILE_OPENED,
            what="a file to write",
            answer_within=ANSWER_SECONDS,
            too_old=_TOO_OLD,
        )
    except BaseException:
        exchange.close()
        raise
    try:
        piped = _check_handed(fd, pipe_allowed=size is not None, sandbox=sandbox)
    except BaseException:
        os.close(fd)
        exchange.close()
        raise
    return _SupervisorWrite(exchange, fd, path, trouble if piped else None)


def _check_handed(fd: int, *, pipe_allowed: bool, sandbox: str) -> bool:
    """Whether `fd`, handed out by a supervisor for a write, is a pipe's write end (allowed
    with `pipe_allowed`) rather than a regular file open for writing; SandboxRuntimeError for
    anything else (a socket, a device, a pipe's read end): a sandbox's supervisor is not
    trusted."""
    kind = os.fstat(fd).st_mode
    access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    if stat.S_ISREG(kind) and access in (os.O_WRONLY, os.O_RDWR):
        return False
    if pipe_allowed and stat.S_ISFIFO(kind) and access == os.O_WRONLY:
        return True
    raise SandboxRuntimeError(
        f"sandbox {sandbox}: its supervisor handed out something other than a file to write"
    )

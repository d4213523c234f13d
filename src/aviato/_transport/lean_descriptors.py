"""Calls of the lean socket's local-only methods that hand the client a descriptor of a
sandbox's file (server/local_files_api.py: OpenForReading, OpenForWriting), and the reader and
writer over it.

Such a call runs on a connection of its own, read with `recvmsg` (the pooled connections are
asyncio transports, whose reads would drop the descriptor): CALL, the request, HALF_CLOSE; then
DESCRIPTOR (the file rides on it), the response and STATUS. A write keeps its connection: after
the descriptor and an empty response the client writes, then sends the end frame and
HALF_CLOSE, and reads the size and STATUS; a connection that ends first drops the write. A
non-OK status raises `grpc.aio.AioRpcError` as every lean call does; UNIMPLEMENTED means "use
the stream" (the caller falls back to ReadFile or WriteFile). The bytes never cross the
service or the socket: the reader and the writer move them with the descriptor, in the kernel
where both ends are files (copy_file_range, else sendfile).

A write into a file the sandbox keeps in memory hands the client the write end of a pipe
instead, which the sandbox's supervisor drains into the file (so that the sandbox's memory
limit counts it). Its writes do not block: each waits at most PIPE_STALL_SECONDS for room, so a
sandbox that stops taking bytes fails the write instead of hanging the client; when the
supervisor stops reading because the write failed (a full memory), the pipe breaks and the
end of the write says why. The descriptor received is checked: a regular file or a pipe's
write end, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import select
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from aviato._fd_passing import receive_with_descriptors
from aviato._transport.base import FileReader, FileWriter
from aviato.v1 import local_frames as lf
from aviato.v1 import sandbox_pb2 as pb

__all__ = [
    "DescriptorFileReader",
    "DescriptorFileWriter",
    "open_for_reading",
    "open_for_writing",
]

OPEN_FOR_READING = "/aviato.local.v1.LocalFiles/OpenForReading"
OPEN_FOR_WRITING = "/aviato.local.v1.LocalFiles/OpenForWriting"
T = TypeVar("T")
_ANSWER_MAX = 64 * 1024  # DESCRIPTOR, a FileInfo and a STATUS: anything longer is not one
_CODES = {code.value[0]: code for code in grpc.StatusCode}
READ_CHUNK = 256 * 1024  # what `next` returns at most (as ReadFile's chunks)
COPY_STEP = 64 << 20  # what one kernel copy moves before progress is told
PIPE_STEP = 1 << 20  # what one write into a pipe moves at most (the pipe holds that much)
PIPE_STALL_SECONDS = 30.0  # a pipe that takes no byte for this long fails the write


class _Call:
    """One descriptor call on a connection of its own, read with `recvmsg`."""

    def __init__(self, path: str, method: str, metadata: Any, timeout: float | None) -> None:
        self._path = path
        self._method = method
        self._metadata = metadata
        self._timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.fds: list[int] = []
        self._data = bytearray()

    async def start(self, first: bytes, half_close: bool) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, self._path)
        call = lf.frame(lf.CALL, lf.encode_call(self._method, self._timeout, self._metadata))
        end = lf.frame(lf.HALF_CLOSE) if half_close else b""
        await loop.sock_sendall(self.sock, call + lf.frame(lf.MESSAGE, first) + end)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def message(self) -> bytes | None:
        """The next response's payload, or None after an OK status (AioRpcError for another)."""
        while True:
            kind, payload = await self._frame()
            if kind == lf.MESSAGE:
                return payload
            if kind == lf.STATUS:
                code, details, trailers = lf.decode_status(payload)
                status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
                if status != grpc.StatusCode.OK:
                    raise _rpc_error(status, details, trailers)
                return None
            if kind not in (lf.DESCRIPTOR, lf.HEADERS):
                raise _rpc_error(grpc.StatusCode.INTERNAL, f"unexpected frame kind {kind}")

    def descriptor(self) -> int:
        """The descriptor that came with the answer (the caller's to close)."""
        if not self.fds:
            raise _rpc_error(grpc.StatusCode.INTERNAL, "the service sent no descriptor")
        return self.fds.pop(0)

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    async def _frame(self) -> tuple[int, bytes]:
        data = self._data
        while True:
            if len(data) >= lf.HEADER_BYTES:
                kind, length = lf.unpack_header(data)
                if length > _ANSWER_MAX:
                    raise _rpc_error(grpc.StatusCode.INTERNAL, "the service's answer is too long")
                if len(data) >= lf.HEADER_BYTES + length:
                    payload = bytes(data[lf.HEADER_BYTES : lf.HEADER_BYTES + length])
                    del data[: lf.HEADER_BYTES + length]
                    return kind, payload
            chunk, received = await receive_with_descriptors(self.sock, _ANSWER_MAX, 4)
            self.fds.extend(received)
            if not chunk:
                raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "the service went away")
            data += chunk


async def _in_time(work: Awaitable[T], limit: float | None) -> T:
    """`work`, with the call's errors as a lean call's: DEADLINE_EXCEEDED, UNAVAILABLE."""
    try:
        async with asyncio.timeout(limit):
            return await work
    except TimeoutError:
        raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
    except OSError as e:
        raise _rpc_error(grpc.StatusCode.UNAVAILABLE, f"the local service: {e}") from e


async def open_for_reading(
    path: str, request: pb.ReadFileRequest, metadata: Any, call_timeout: float | None
) -> tuple[int, pb.FileInfo]:
    """Calls OpenForReading on the lean socket at `path`: (descriptor, size and mode)."""
    call = _Call(path, OPEN_FOR_READING, metadata, call_timeout)
    try:

        async def answer() -> bytes | None:
            await call.start(request.SerializeToString(), half_close=True)
            info = await call.message()
            if info is not None and await call.message() is None:
                return info
            raise _rpc_error(grpc.StatusCode.INTERNAL, "the service sent no single response")

        info = await _in_time(answer(), call_timeout)
        assert info is not None
        return call.descriptor(), pb.FileInfo.FromString(info)
    finally:
        call.close()


async def open_for_writing(
    path: str,
    header: pb.WriteFileHeader,
    metadata: Any,
    call_timeout: float | None,
    failed: Callable[[grpc.RpcError], BaseException],
) -> DescriptorFileWriter:
    """Calls OpenForWriting on the lean socket at `path`: a writer whose file is in place once
    `finish` returns (see DescriptorFileWriter; `failed` turns the status of a failed end into
    the error raised)."""
    call = _Call(path, OPEN_FOR_WRITING, metadata, call_timeout)
    try:

        async def answer() -> bytes | None:
            await call.start(pb.WriteFileRequest(header=header).SerializeToString(), False)
            return await call.message()

        if await _in_time(answer(), call_timeout) is None:
            raise _rpc_error(grpc.StatusCode.INTERNAL, "the service ended the write at once")
        fd = call.descriptor()
        try:
            piped = _is_pipe_to_write(fd)
        except BaseException:
            os.close(fd)
            raise
        return DescriptorFileWriter(call, fd, call_timeout, piped, failed)
    except BaseException:
        call.close()
        raise


def _is_pipe_to_write(fd: int) -> bool:
    """Whether the descriptor the service handed out for a write is a pipe (else a regular
    file); INTERNAL for anything else, or one not open for writing (a pipe's read end). A
    pipe is made non-blocking here whatever it was handed out as: a blocking one that nobody
    reads would hold its writer past PIPE_STALL_SECONDS, forever."""
    kind = os.fstat(fd).st_mode
    access = _access_mode(fd)
    if stat.S_ISREG(kind) and access in (os.O_WRONLY, os.O_RDWR):
        return False
    if stat.S_ISFIFO(kind) and access == os.O_WRONLY:
        os.set_blocking(fd, False)
        return True
    raise _rpc_error(grpc.StatusCode.INTERNAL, "the service handed out no file to write")


def _rpc_error(
    code: grpc.StatusCode, details: str, trailers: lf.Metadata = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details, None
    )


class _DescriptorSteps:
    """A descriptor that worker-thread steps use one at a time, and that is closed once its
    owner ends it (`_end`) and no step uses it any more: closed under a running step, its
    number could be reused by another file the step would then read or write. A step of an
    owner whose caller was cancelled runs to its end (a pipe breaks, a write returns)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._busy = False  # a worker thread uses the descriptor
        self._ending = False

    async def _in_thread(self, work: Callable[[], Any]) -> Any:
        if self._fd < 0:
            raise OSError(errno.EBADF, "the descriptor was closed")
        task = _in_worker(work)
        self._busy = True
        task.add_done_callback(self._work_done)
        return await asyncio.shield(task)

    def _work_done(self, task: asyncio.Future[Any]) -> None:
        self._busy = False
        if not task.cancelled():
            task.exception()  # retrieved: an owner that went away does not wait for it
        if self._ending:
            self._fd = _closed(self._fd)

    def _end(self) -> None:
        self._ending = True
        if not self._busy:
            self._fd = _closed(self._fd)


class DescriptorFileReader(_DescriptorSteps, FileReader):
    """A sandbox's file read through its descriptor: at most `size` bytes (what it held when it
    was opened; fewer if it shrank since), in worker threads so that a slow disk never stalls
    the event loop. `cancel` (or the end) closes the descriptor once no read uses it."""

    def __init__(self, fd: int, info: pb.FileInfo) -> None:
        super().__init__(fd)
        self.size = info.size
        self.mode = info.mode
        self._offset = 0

    async def next(self) -> bytes | None:
        if self._ending or self._offset >= self.size:
            self.cancel()
            return None
        read = functools.partial(
            os.pread, self._fd, min(READ_CHUNK, self.size - self._offset), self._offset
        )
        data: bytes = await self._in_thread(read)
        if not data:
            self.cancel()
            return None
        self._offset += len(data)
        return data

    async def copy_into(self, fd: int, progress: Callable[[int], None] | None) -> int:
        """In the kernel (copy_file_range, else sendfile), at `fd`'s offset, COPY_STEP at a
        time."""
        out_fd = fd
        while not self._ending and self._offset < self.size:
            step = functools.partial(
                _copy, self._fd, out_fd, self._offset, min(COPY_STEP, self.size - self._offset)
            )
            moved: int = await self._in_thread(step)
            if not moved:
                break
            self._offset += moved
            if progress is not None:
                progress(self._offset)
        self.cancel()
        return self._offset

    def cancel(self) -> None:
        self._end()


def _copy(in_fd: int, out_fd: int, offset: int, count: int) -> int:
    """Up to `count` bytes of `in_fd` from `offset` appended at `out_fd`'s offset, in the
    kernel; the bytes moved (0: the end of the file)."""
    done = 0
    while done < count:
        try:
            moved = os.copy_file_range(in_fd, out_fd, count - done, offset + done)
        except OSError:  # across file systems on older kernels, or not supported here
            moved = os.sendfile(out_fd, in_fd, offset + done, count - done)
        if not moved:
            break
        done += moved
    return done


class DescriptorFileWriter(_DescriptorSteps, FileWriter):
    """A local write through a descriptor (OpenForWriting): `write` and `copy_from` put bytes
    into a new file of the sandbox's in the kernel or with plain writes (worker threads), or
    into the pipe its supervisor drains (`piped`: see the module docstring), and `finish` puts
    it in place and returns its size; `cancel` (or any failure) leaves no file. Used from one
    task, one step at a time."""

    def __init__(
        self,
        call: _Call,
        fd: int,
        timeout: float | None,
        piped: bool,
        failed: Callable[[grpc.RpcError], BaseException],
    ) -> None:
        super().__init__(fd)
        self._call = call
        self._timeout = timeout
        self._piped = piped
        self._failed = failed
        self._broken = False  # the pipe broke: the supervisor ended the write (finish says why)

    async def write(self, data: memoryview) -> None:
        if not self._piped:
            await self._in_thread(functools.partial(_write_all, self._fd, data))
            return
        fd = self._fd

        def move(done: int) -> int:
            return os.write(fd, data[done : done + PIPE_STEP])

        await self._into_pipe(move, len(data))

    async def copy_from(self, source: int, progress: Callable[[int], None] | None) -> int:
        """Copies `source` from its offset to its end; the bytes copied, told to `progress`
        after each step."""
        done = 0
        while not self._broken:
            if self._piped:
                moved = await self._into_pipe(  # a step a pipe holds: progress as it goes
                    functools.partial(_splice, source, self._fd, PIPE_STEP), PIPE_STEP
                )
            else:
                moved = await self._in_thread(
                    functools.partial(_copy_on, source, self._fd, COPY_STEP)
                )
            if not moved:
                break
            done += moved
            if progress is not None:
                progress(done)
        return done

    async def _into_pipe(self, move: Callable[[int], int], count: int) -> int:
        """`move(done)` into the pipe until `count` bytes moved or it moves none, in one worker
        thread that waits for room (`_moved_into_pipe`); the bytes moved, 0 once it broke."""
        try:
            moved: int = await self._in_thread(
                functools.partial(_moved_into_pipe, self._fd, move, count)
            )
        except BrokenPipeError:
            self._broken = True
            return 0
        return moved

    async def finish(self) -> int:
        """Ends the write: the file is in place, with the size returned. After a broken pipe the
        service's answer says why the sandbox stopped taking the bytes (a full memory)."""
        self._fd = _closed(self._fd)
        call = self._call
        try:

            async def answer() -> bytes | None:
                end = pb.WriteFileRequest(end=True).SerializeToString()
                await call.send(lf.frame(lf.MESSAGE, end) + lf.frame(lf.HALF_CLOSE))
                response = await call.message()
                if response is not None and await call.message() is None:
                    return response
                raise _rpc_error(grpc.StatusCode.INTERNAL, "the service sent no final response")

            try:
                response = await _in_time(answer(), self._timeout)
            except grpc.RpcError as err:
                raise self._failed(err) from None
            assert response is not None
            if self._broken:  # the supervisor stopped reading, yet reports no error
                raise OSError(errno.EPIPE, "the sandbox stopped taking the bytes")
            return int(pb.WriteFileResponse.FromString(response).size)
        finally:
            call.close()

    def cancel(self) -> None:
        self._end()
        self._call.close()  # the service drops the write when the connection ends


def _in_worker(work: Callable[[], Any]) -> asyncio.Future[Any]:
    """`work` in a worker thread (the loop's default executor). While the interpreter exits
    no new work reaches a thread (the executor refuses it): then `work` runs here, on the
    loop, which is what lets a `write_file` or `upload_file` fired just before the end of a
    script finish (the SDK finishes those at exit); each step is bounded (a pipe's wait for
    room by PIPE_STALL_SECONDS)."""
    loop = asyncio.get_running_loop()
    try:
        return loop.run_in_executor(None, work)
    except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
        done = loop.create_future()
        try:
            done.set_result(work())
        except Exception as e:
            done.set_exception(e)
        return done


def _moved_into_pipe(fd: int, move: Callable[[int], int], count: int) -> int:
    """Calls `move(done)` (one non-blocking write or splice into the pipe `fd`; the bytes it
    moved, 0 at the end) until `count` bytes moved, waiting for room between calls; the bytes
    moved. OSError (ETIMEDOUT) when the pipe has no room for PIPE_STALL_SECONDS,
    BrokenPipeError once its reader closed it. SIGPIPE is blocked meanwhile and a pending one
    taken back: a program that restored its default action (which ends the process) gets the
    error, not the signal."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    kept = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    done = 0
    try:
        while done < count:
            try:
                moved = move(done)
            except BlockingIOError:
                if not poller.poll(PIPE_STALL_SECONDS * 1000):
                    raise OSError(
                        errno.ETIMEDOUT,
                        f"the sandbox took no bytes for {PIPE_STALL_SECONDS:g} seconds "
                        "(is it paused or overloaded?)",
                    ) from None
                continue
            except BrokenPipeError:
                signal.sigtimedwait({signal.SIGPIPE}, 0)
                raise
            if not moved:
                break
            done += moved
        return done
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, kept)


def _splice(source: int, pipe: int, count: int, done: int) -> int:
    """Up to PIPE_STEP of the `count - done` bytes left, from `source`'s offset into the pipe,
    in the kernel; 0 at the end of `source`."""
    return os.splice(source, pipe, min(PIPE_STEP, count - done), flags=os.SPLICE_F_NONBLOCK)


def _closed(fd: int) -> int:
    """Closes `fd` unless it is -1 (already closed); -1."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    return -1


def _access_mode(fd: int) -> int:
    """`fd`'s access mode: os.O_RDONLY, O_WRONLY or O_RDWR."""
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _copy_on(source: int, target: int, count: int) -> int:
    """Up to `count` bytes from `source`'s offset to `target`'s, in the kernel; 0 at the end."""
    try:
        return os.copy_file_range(source, target, count)
    except OSError:  # across file systems on older kernels, or not supported here
        return os.sendfile(target, source, None, count)

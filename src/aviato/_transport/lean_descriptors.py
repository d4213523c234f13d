"""Calls of the lean socket's local-only methods that hand the client a descriptor (a sandbox's
file: server/files_api.py `OpenForReading`), and the file reader over it.

Such a call runs on a connection of its own, read with `recvmsg` (the pooled connections are
asyncio transports, whose reads would drop the descriptor): CALL, the request, HALF_CLOSE; then
DESCRIPTOR (the file rides on it), the response and STATUS. A non-OK status raises
`grpc.aio.AioRpcError` as every lean call does; UNIMPLEMENTED means "read it the usual way"
(the caller falls back to ReadFile). The bytes of a file read this way never cross the service
or the socket: `DescriptorFileReader` reads them from the descriptor, and copies them into a
local file in the kernel (`copy_into`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import os
import socket
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from aviato._transport.base import FileReader
from aviato.v1 import local_frames as lf
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["OPEN_FOR_READING", "DescriptorFileReader", "open_for_reading"]

OPEN_FOR_READING = "/aviato.local.v1.LocalFiles/OpenForReading"
_ANSWER_MAX = 64 * 1024  # DESCRIPTOR, a FileInfo and a STATUS: anything longer is not one
_CODES = {code.value[0]: code for code in grpc.StatusCode}
READ_CHUNK = 256 * 1024  # what `next` returns at most (as ReadFile's chunks)
COPY_STEP = 64 << 20  # what one kernel copy moves before progress is told


async def open_for_reading(
    path: str, request: pb.ReadFileRequest, metadata: Any, call_timeout: float | None
) -> tuple[int, pb.FileInfo]:
    """Calls OpenForReading on the lean socket at `path`: (descriptor, size and mode)."""
    timeout = call_timeout
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    fds: list[int] = []
    try:
        async with asyncio.timeout(timeout):
            try:
                await loop.sock_connect(sock, path)
                body = request.SerializeToString()
                await loop.sock_sendall(
                    sock,
                    lf.frame(lf.CALL, lf.encode_call(OPEN_FOR_READING, timeout, metadata))
                    + lf.frame(lf.MESSAGE, body)
                    + lf.frame(lf.HALF_CLOSE),
                )
                info = await _answer(loop, sock, fds)
            except OSError as e:
                raise _rpc_error(grpc.StatusCode.UNAVAILABLE, f"the local service: {e}") from e
        if not fds:
            raise _rpc_error(grpc.StatusCode.INTERNAL, "the service sent no descriptor")
        return fds.pop(0), info
    except TimeoutError:
        raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
    finally:
        sock.close()
        for fd in fds:
            os.close(fd)


async def _answer(loop: asyncio.AbstractEventLoop, sock: socket.socket, fds: list[int]) -> Any:
    """Reads the answer's frames (descriptors into `fds`) up to STATUS; the FileInfo."""
    data = bytearray()
    info: pb.FileInfo | None = None
    while True:
        while len(data) >= lf.HEADER_BYTES:
            kind, length = lf.unpack_header(data)
            if len(data) < lf.HEADER_BYTES + length:
                break
            payload = bytes(data[lf.HEADER_BYTES : lf.HEADER_BYTES + length])
            del data[: lf.HEADER_BYTES + length]
            if kind == lf.MESSAGE and info is None:
                info = pb.FileInfo.FromString(payload)
            elif kind == lf.STATUS:
                code, details, trailers = lf.decode_status(payload)
                status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
                if status != grpc.StatusCode.OK:
                    raise _rpc_error(status, details, trailers)
                if info is None:
                    raise _rpc_error(grpc.StatusCode.INTERNAL, "the service sent no response")
                return info
            elif kind not in (lf.DESCRIPTOR, lf.HEADERS):
                raise _rpc_error(grpc.StatusCode.INTERNAL, f"unexpected frame kind {kind}")
        if len(data) > _ANSWER_MAX:
            raise _rpc_error(grpc.StatusCode.INTERNAL, "the service's answer is too long")
        chunk = await _receive(loop, sock, fds)
        if not chunk:
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "the service went away before its answer")
        data += chunk


async def _receive(loop: asyncio.AbstractEventLoop, sock: socket.socket, fds: list[int]) -> bytes:
    space = socket.CMSG_SPACE(4 * array.array("i").itemsize)
    while True:
        try:
            chunk, ancillary, _, _ = sock.recvmsg(_ANSWER_MAX, space, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock)
            continue
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        return chunk


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _rpc_error(
    code: grpc.StatusCode, details: str, trailers: lf.Metadata = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details, None
    )


class DescriptorFileReader(FileReader):
    """A sandbox's file read through its descriptor: at most `size` bytes (what it held when it
    was opened; fewer if it shrank since), in worker threads so that a slow disk never stalls
    the event loop. `cancel` (or the end) closes the descriptor once no read uses it."""

    def __init__(self, fd: int, info: pb.FileInfo) -> None:
        self.size = info.size
        self.mode = info.mode
        self._fd = fd
        self._offset = 0
        self._busy = False
        self._closed = False

    async def next(self) -> bytes | None:
        if self._closed or self._offset >= self.size:
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
        while not self._closed and self._offset < self.size:
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

    async def _in_thread(self, work: Callable[[], Any]) -> Any:
        task = asyncio.ensure_future(asyncio.to_thread(work))
        self._busy = True
        task.add_done_callback(self._work_done)
        return await asyncio.shield(task)  # a cancelled reader leaves the work to end

    def _work_done(self, task: asyncio.Future[Any]) -> None:
        self._busy = False
        if not task.cancelled():
            task.exception()  # retrieved: a reader that went away does not wait for it
        if self._closed:
            self._close()

    def cancel(self) -> None:
        self._closed = True
        if not self._busy:
            self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


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

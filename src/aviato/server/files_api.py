"""The file streams of aviato.v1.SandboxService: ReadFile and WriteFile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from aviato.runtime.base import FileInfo, SandboxHandle, SandboxRuntimeError, Unsupported
from aviato.server import errors, validation
from aviato.server.errors import InvalidArgument, ServiceError
from aviato.server.servicer import ServicerBase
from aviato.server.streams import Resumable, drain_upload
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = ["FileStreams", "first_header", "write_target"]

log = logging.getLogger("aviato.server.api")

FILE_CHUNK = 256 * 1024
READ_AHEAD = 4 * FILE_CHUNK  # what one read of a file's descriptor takes (one thread hop)
# One file's size through WriteFile. The real bound is where it lands (the writable layer's
# disk limit, ENOSPC); this one only keeps a counter sane. 10 GiB must pass (issue 17).
MAX_WRITE_BYTES = 1 << 40
# What is read and dropped after a refused write, so that the client reads the status rather
# than a reset; a client that keeps sending past it is cut off.
DRAIN_BYTES = 64 << 20


async def _open_for_reading(
    handle: SandboxHandle, path: str
) -> tuple[FileInfo, AsyncIterator[bytes]]:
    """The file's info and bytes: read here through its descriptor where the runtime hands one
    out (a regular file: one hop less than the supervisor's stream), else streamed by it."""
    try:
        fd, info = await handle.open_for_reading(path)
    except Unsupported:
        return await handle.read_file(path)
    return info, _descriptor_chunks(fd, info.size)


async def _descriptor_chunks(fd: int, size: int) -> AsyncIterator[bytes]:
    """Up to `size` bytes of `fd` (what the file held when it was opened; less if it shrank),
    read in a worker thread READ_AHEAD at a time; closes `fd`, once no read uses it (a read
    still running in its thread when the reader goes away closes it as it ends)."""
    read: asyncio.Future[bytes] | None = None
    try:
        offset = 0
        while offset < size:
            length = min(READ_AHEAD, size - offset)
            read = asyncio.ensure_future(asyncio.to_thread(os.pread, fd, length, offset))
            data = await asyncio.shield(read)
            if not data:
                return
            offset += len(data)
            yield data
    finally:
        if read is not None and not read.done():
            read.add_done_callback(lambda done: _close_after(done, fd))
        else:
            os.close(fd)


def _close_after(read: asyncio.Future[bytes], fd: int) -> None:
    if not read.cancelled():
        read.exception()  # retrieved: nobody waits for it any more
    os.close(fd)


async def first_header(requests: AsyncIterator[pb.WriteFileRequest]) -> pb.WriteFileHeader:
    """The header a write's request stream must begin with (InvalidArgument otherwise)."""
    first = await anext(requests, None)
    if first is None:
        raise InvalidArgument("header", "the stream ended before a header")
    if first.WhichOneof("msg") != "header":
        raise InvalidArgument("header", "the first frame must be the header")
    return first.header


def write_target(header: pb.WriteFileHeader) -> tuple[str, int]:
    """The file a write's header names and its mode, checked (InvalidArgument), and its
    declared size (`header.size`: 0, not said, to 1 TiB)."""
    path = validation.validate_path(header.path, "header.path")
    if path == "/":
        raise InvalidArgument("header.path", "must name a file")
    if not 0 <= header.size <= MAX_WRITE_BYTES:
        raise InvalidArgument("header.size", "must be from 0 (not said) to 1 TiB")
    return path, validation.validate_file_mode(header.mode, "header.mode")


def _incomplete(declared: int, sent: int) -> InvalidArgument:
    """The error of a write whose bytes are not the `declared` size of its header."""
    if sent > declared:
        return InvalidArgument("header.size", f"more bytes sent than the {declared} declared")
    return InvalidArgument(
        "header.size", f"incomplete write: {sent} bytes sent, the header declared {declared}"
    )


class FileStreams(ServicerBase):
    """ReadFile and WriteFile."""

    async def ReadFile(self, request: pb.ReadFileRequest, context: Ctx) -> None:
        """The info frame, then the data. A coroutine writing with context.write() rather than
        an async generator, so that a client that goes away mid-file (cancelled, or refusing the
        size it was told) cancels it, and the read is closed at once: left open, its unread
        chunks pile up on the sandbox's supervisor connection until that connection stops
        reading, which stalls every command and transfer of the sandbox."""
        owner = await self._owner_or_abort(context)
        try:
            path = validation.validate_path(request.path, "path")
            handle = await self._lifecycle.running_handle(owner, request.sandbox_id)
            info, chunks = await _open_for_reading(handle, path)
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=request.sandbox_id, path=request.path)
        write = context.write
        with self._lifecycle.activity(request.sandbox_id):  # for idle_timeout
            try:
                await write(pb.ReadFileResponse(info=pb.FileInfo(size=info.size, mode=info.mode)))
                async for chunk in chunks:
                    for i in range(0, len(chunk), FILE_CHUNK):
                        await write(pb.ReadFileResponse(data=chunk[i : i + FILE_CHUNK]))
            except (ServiceError, SandboxRuntimeError) as e:
                await errors.abort(context, e, sandbox_id=request.sandbox_id, path=request.path)
            finally:
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()

    async def WriteFile(
        self,
        request_iterator: AsyncIterator[pb.WriteFileRequest],
        context: Ctx,
    ) -> pb.WriteFileResponse:
        owner = await self._owner_or_abort(context)
        requests = Resumable(aiter(request_iterator))
        problem: list[ServiceError] = []

        async def chunks() -> AsyncIterator[bytes]:
            """The data frames up to the end frame. The runtime keeps the file only when this
            iterator finishes normally, so raising here (no end frame: the client died or gave
            up mid-upload) discards what was written."""
            total = 0
            ended = False
            async for req in requests:
                kind = req.WhichOneof("msg")
                if kind == "end" and req.end and not ended:
                    ended = True
                    continue
                if ended or kind != "data":
                    where = "after the end frame" if ended else "after the header"
                    problem.append(InvalidArgument(kind or "msg", f"unexpected frame {where}"))
                    raise problem[-1]
                total += len(req.data)
                if total > MAX_WRITE_BYTES:
                    problem.append(InvalidArgument("data", "the file is larger than 1 TiB"))
                    raise problem[-1]
                if header.size and total > header.size:
                    problem.append(_incomplete(header.size, total))
                    raise problem[-1]
                if req.data:
                    yield req.data
            if not ended:
                problem.append(
                    InvalidArgument("end", "the stream ended before its end frame: nothing written")
                )
                raise problem[-1]
            if header.size and total != header.size:
                problem.append(_incomplete(header.size, total))
                raise problem[-1]

        header = pb.WriteFileHeader()
        try:
            header = await first_header(requests)
            path, mode = write_target(header)
            handle = await self._lifecycle.running_handle(owner, header.sandbox_id)
            with self._lifecycle.activity(header.sandbox_id):  # for idle_timeout
                size = await handle.write_file(path, mode, header.make_parents, chunks())
        except (ServiceError, SandboxRuntimeError) as e:
            err: ServiceError | SandboxRuntimeError = problem[0] if problem else e
            if not problem:
                await drain_upload(requests, DRAIN_BYTES)
            await errors.abort(context, err, sandbox_id=header.sandbox_id, path=header.path)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise  # AbortError: the call already has its status (e.g. a malformed frame)
        except Exception:
            if problem:
                await errors.abort(context, problem[0])
            log.exception("WriteFile failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
            raise
        return pb.WriteFileResponse(size=size)

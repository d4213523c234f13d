"""The directory-tree streams of aviato.v1.SandboxService: UploadTree and DownloadTree.

A tree travels as an uncompressed tar stream (`aviato.v1.tar_stream`) over the chunked file path.
Upload: the service parses the stream as it arrives (the parser checks every entry's name and
kind) and acts on each entry beneath the target directory through the supervisor's WRITE_AT and
FS_OP with a relative name: nothing below the target is followed if it is a symlink, whether the
sandbox planted it or an earlier entry of the same archive did. Directory modes and times are
applied at the end (a directory written into would lose its mtime). Download: the service walks
the tree with LIST beneath the root (paginated) and reads each file with READ_AT, following no
symlink, and sends PAX headers and data as they come. Memory: one chunk per file in flight, the
directories still to visit (their names) and, on upload, the directories whose modes are pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

import grpc

from aviato.runtime.base import PathOp, SandboxHandle, SandboxRuntimeError
from aviato.server import errors, validation
from aviato.server.errors import InvalidArgument, ServiceError
from aviato.server.servicer import ServicerBase
from aviato.server.streams import Resumable, drain_upload
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.tar_stream import END, TarEntry, TarError, TarParser, header, padding

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = ["TreeStreams"]

log = logging.getLogger("aviato.server.api")

CHUNK = 256 * 1024
MAX_DIRS_PENDING = 200_000  # directories of one upload whose modes are applied at the end
MAX_DEPTH = 256  # directories deep a download goes
LIST_PAGE = 10_000


class _TreeWriter:
    """Acts on the parsed entries of one upload, beneath `root`."""

    def __init__(self, handle: SandboxHandle, root: str) -> None:
        self._handle = handle
        self._root = root
        self._dirs: list[TarEntry] = []
        self._file: asyncio.Queue[bytes | None] | None = None
        self._writing: asyncio.Task[int] | None = None
        self.written = 0

    async def entry(self, entry: TarEntry) -> None:
        await self.end_file()
        if entry.kind == "dir":
            if entry.name:
                await self._handle.path_op(
                    PathOp("mkdir", self._root, rel=entry.name, parents=True)
                )
            if len(self._dirs) >= MAX_DIRS_PENDING:
                raise InvalidArgument("data", f"more than {MAX_DIRS_PENDING} directories")
            self._dirs.append(entry)
        elif entry.kind == "symlink":
            await self._ensure_parent(entry.name)
            await self._handle.path_op(
                PathOp("symlink", self._root, rel=entry.name, arg=entry.target)
            )
            op = PathOp("set_meta", self._root, rel=entry.name, mtime_ns=entry.mtime_ns)
            await self._handle.path_op(op)
        else:
            queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)

            async def chunks() -> AsyncIterator[bytes]:
                while (data := await queue.get()) is not None:
                    yield data

            self._file = queue
            self._writing = asyncio.ensure_future(
                self._handle.write_file_at(
                    self._root, entry.name, entry.mode & 0o1777, entry.mtime_ns, chunks()
                )
            )
            if entry.size == 0:
                await self.end_file()

    async def _ensure_parent(self, name: str) -> None:
        parent = name.rpartition("/")[0]
        if parent:
            await self._handle.path_op(PathOp("mkdir", self._root, rel=parent, parents=True))

    async def data(self, data: bytes) -> None:
        assert self._file is not None and self._writing is not None
        put = asyncio.ensure_future(self._file.put(data))
        await asyncio.wait((put, self._writing), return_when=asyncio.FIRST_COMPLETED)
        if not put.done():  # the write ended (refused): its error says why
            put.cancel()
            await self._writing

    async def end_file(self) -> None:
        if self._writing is None:
            return
        assert self._file is not None
        writing, self._writing = self._writing, None
        if not writing.done():
            await self._file.put(None)
        self.written += await writing

    async def abort(self) -> None:
        if self._writing is not None:
            self._writing.cancel()
            with contextlib.suppress(BaseException):
                await self._writing
            self._writing = None

    async def finish(self) -> None:
        await self.end_file()
        for entry in reversed(self._dirs):  # deepest last-made first; the root last
            op = PathOp(
                "set_meta",
                self._root,
                rel=entry.name,
                mode=entry.mode & 0o1777,
                mtime_ns=entry.mtime_ns,
            )
            with contextlib.suppress(SandboxRuntimeError):  # replaced meanwhile: skipped
                await self._handle.path_op(op)


async def _tree_chunks(handle: SandboxHandle, root: str) -> AsyncGenerator[bytes, None]:
    """The tar stream of the tree at `root`, in pieces of about CHUNK bytes."""
    out = bytearray()
    top = (await handle.path_op(PathOp("stat", root))).entries[0]
    if top.type == "symlink":  # the root itself may be reached through a link
        top = (await handle.path_op(PathOp("stat", root, rel=""))).entries[0]
    out += header(TarEntry("", "dir", top.mode, top.mtime_ns))
    stack: list[tuple[str, int]] = [("", 0)]
    while stack:
        rel, offset = stack.pop()
        listing = await handle.path_op(
            PathOp("list", root, rel=rel, offset=offset, limit=LIST_PAGE)
        )
        if listing.truncated:
            stack.append((rel, offset + len(listing.entries)))
        subdirs: list[str] = []
        for e in listing.entries:
            name = f"{rel}/{e.name}" if rel else e.name
            if e.type == "dir":
                out += header(TarEntry(name, "dir", e.mode, e.mtime_ns))
                if name.count("/") + 1 >= MAX_DEPTH:
                    raise InvalidArgument("path", f"{name!r}: deeper than {MAX_DEPTH} directories")
                subdirs.append(name)
            elif e.type == "symlink":
                out += header(TarEntry(name, "symlink", e.mode, e.mtime_ns, 0, e.target))
            elif e.type == "file":
                info, data = await handle.read_file_at(root, name)
                try:
                    size = info.size  # as the read began; a file that changes is cut or padded
                    out += header(TarEntry(name, "file", e.mode, e.mtime_ns, size))
                    sent = 0
                    if size:
                        async for chunk in data:
                            chunk = chunk[: size - sent]
                            out += chunk
                            sent += len(chunk)
                            if len(out) >= CHUNK:
                                yield bytes(out)
                                out.clear()
                            if sent >= size:
                                break
                    while sent < size:  # shrank while read: zeros keep the stream whole
                        n = min(CHUNK, size - sent)
                        out += bytes(n)
                        sent += n
                        if len(out) >= CHUNK:
                            yield bytes(out)
                            out.clear()
                    out += padding(size)
                finally:
                    aclose = getattr(data, "aclose", None)
                    if aclose is not None:
                        with contextlib.suppress(Exception):
                            await aclose()
            if len(out) >= CHUNK:
                yield bytes(out)
                out.clear()
        stack.extend((d, 0) for d in reversed(subdirs))
    out += END
    yield bytes(out)


class TreeStreams(ServicerBase):
    """UploadTree and DownloadTree."""

    async def DownloadTree(self, request: pb.ReadFileRequest, context: Ctx) -> None:
        owner = await self._owner_or_abort(context)
        try:
            root = validation.validate_path(request.path, "path")
            handle = await self._lifecycle.running_handle(owner, request.sandbox_id)
            chunks = _tree_chunks(handle, root)
            first = await anext(chunks)
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=request.sandbox_id, path=request.path)
        try:
            await context.write(pb.ReadFileResponse(info=pb.FileInfo(size=0, mode=0o755)))
            await context.write(pb.ReadFileResponse(data=first))
            async for chunk in chunks:
                await context.write(pb.ReadFileResponse(data=chunk))
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=request.sandbox_id, path=request.path)
        finally:
            await chunks.aclose()

    async def UploadTree(
        self, request_iterator: AsyncIterator[pb.WriteFileRequest], context: Ctx
    ) -> pb.WriteFileResponse:
        owner = await self._owner_or_abort(context)
        requests = Resumable(aiter(request_iterator))
        header_ = pb.WriteFileHeader()
        writer: _TreeWriter | None = None
        try:
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                raise InvalidArgument("header", "the stream ended before a header") from None
            if first.WhichOneof("msg") != "header":
                raise InvalidArgument("header", "the first frame must be the header")
            header_ = first.header
            root = validation.validate_path(header_.path, "header.path")
            handle = await self._lifecycle.running_handle(owner, header_.sandbox_id)
            await handle.path_op(PathOp("mkdir", root, parents=True))
            writer = _TreeWriter(handle, root)
            parser = TarParser()
            ended = False
            async for req in requests:
                kind = req.WhichOneof("msg")
                if kind == "end" and req.end and not ended:
                    ended = True
                    break
                if kind != "data":
                    raise InvalidArgument(kind or "msg", "unexpected frame after the header")
                try:
                    events = parser.feed(req.data)
                except TarError as e:
                    raise InvalidArgument("data", str(e)) from None
                for what, value in events:
                    if what == "entry":
                        assert isinstance(value, TarEntry)
                        await writer.entry(value)
                    elif what == "data":
                        assert isinstance(value, bytes)
                        await writer.data(value)
            if not ended:
                raise InvalidArgument("end", "the stream ended before its end frame")
            try:
                parser.close()
            except TarError as e:
                raise InvalidArgument("data", str(e)) from None
            await writer.finish()
        except (ServiceError, SandboxRuntimeError) as e:
            if writer is not None:
                await writer.abort()
            await drain_upload(requests, 1 << 30)
            await errors.abort(context, e, sandbox_id=header_.sandbox_id, path=header_.path)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            if writer is not None:
                await writer.abort()
            raise
        return pb.WriteFileResponse(size=writer.written)

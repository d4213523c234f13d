"""The directory and metadata calls of aviato.v1.SandboxService: StatPath, ListDir, RemovePath,
MakeDir, RenamePath. Each is one FS_OP of the sandbox's supervisor (runtime `path_op`), in the
sandbox's own view of its file system with the privileges of the file transfers."""

from __future__ import annotations

import posixpath
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from aviato.runtime.base import FileEntry, PathOp, SandboxRuntimeError
from aviato.server import errors, validation
from aviato.server.errors import InvalidArgument, ServiceError
from aviato.server.servicer import ServicerBase
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = ["PathCalls", "encode_entry"]

LIST_MAX = 10_000  # entries per ListDir answer (the supervisor's FS_LIST_MAX)
LIST_BYTES = 3 << 20  # about this much per answer, under gRPC's 4 MiB message cap

_R = TypeVar("_R")


def encode_entry(entry: FileEntry) -> pb.FileEntry:
    mtime = Timestamp()
    mtime.FromNanoseconds(entry.mtime_ns)
    return pb.FileEntry(
        name=entry.name,
        type=entry.type,
        size=entry.size,
        mode=entry.mode,
        mtime=mtime,
        target=entry.target,
    )


class PathCalls(ServicerBase):
    """StatPath, ListDir, RemovePath, MakeDir, RenamePath."""

    async def _call(
        self, context: Ctx, sandbox_id: str, path: str, body: Callable[[str], Awaitable[_R]]
    ) -> _R:
        owner = await self._owner_or_abort(context)
        try:
            return await body(owner)
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=sandbox_id, path=path)

    async def _op(self, owner: str, sandbox_id: str, op: PathOp) -> Any:
        handle = await self._lifecycle.running_handle(owner, sandbox_id)
        return await handle.path_op(op)

    async def StatPath(self, request: pb.PathRequest, context: Ctx) -> pb.FileEntry:
        async def body(owner: str) -> pb.FileEntry:
            path = validation.validate_path(request.path, "path")
            result = await self._op(owner, request.sandbox_id, PathOp("stat", path))
            return encode_entry(result.entries[0])

        return await self._call(context, request.sandbox_id, request.path, body)

    async def ListDir(self, request: pb.ListDirRequest, context: Ctx) -> pb.ListDirResponse:
        async def body(owner: str) -> pb.ListDirResponse:
            path = validation.validate_path(request.path, "path")
            if request.offset < 0:
                raise InvalidArgument("offset", "must be 0 or more")
            if request.limit < 0:
                raise InvalidArgument("limit", "must be 0 or more (0: 10,000)")
            limit = min(request.limit or LIST_MAX, LIST_MAX)
            op = PathOp("list", path, offset=request.offset, limit=limit)
            result = await self._op(owner, request.sandbox_id, op)
            answer = pb.ListDirResponse(truncated=result.truncated)
            size = 0
            for i, entry in enumerate(result.entries):
                size += len(entry.name) + len(entry.target) + 64
                if size > LIST_BYTES:  # the rest is for the next call
                    answer.truncated = True
                    answer.next_offset = request.offset + i
                    return answer
                answer.entries.append(encode_entry(entry))
            answer.next_offset = request.offset + len(result.entries)
            return answer

        return await self._call(context, request.sandbox_id, request.path, body)

    async def RemovePath(self, request: pb.RemovePathRequest, context: Ctx) -> pb.PathDone:
        async def body(owner: str) -> pb.PathDone:
            path = validation.validate_path(request.path, "path")
            if path == "/":
                raise InvalidArgument("path", "'/' is the sandbox's root: it is never removed")
            record = self._lifecycle.record(owner, request.sandbox_id)
            workdir = record.config.working_dir
            if workdir and posixpath.normpath(workdir) == path:
                raise InvalidArgument(
                    "path", f"{path!r} is the sandbox's working directory: it is never removed"
                )
            op = PathOp("remove", path, recursive=request.recursive)
            await self._op(owner, request.sandbox_id, op)
            return pb.PathDone()

        return await self._call(context, request.sandbox_id, request.path, body)

    async def MakeDir(self, request: pb.MakeDirRequest, context: Ctx) -> pb.PathDone:
        async def body(owner: str) -> pb.PathDone:
            path = validation.validate_path(request.path, "path")
            mode = validation.validate_file_mode(request.mode or 0o755, "mode")
            op = PathOp("mkdir", path, parents=request.parents, mode=mode)
            await self._op(owner, request.sandbox_id, op)
            return pb.PathDone()

        return await self._call(context, request.sandbox_id, request.path, body)

    async def RenamePath(self, request: pb.RenamePathRequest, context: Ctx) -> pb.PathDone:
        async def body(owner: str) -> pb.PathDone:
            source = validation.validate_path(request.source, "source")
            destination = validation.validate_path(request.destination, "destination")
            for name, value in (("source", source), ("destination", destination)):
                if value == "/":
                    raise InvalidArgument(name, "'/' cannot be renamed or replaced")
            op = PathOp("rename", source, arg=destination)
            await self._op(owner, request.sandbox_id, op)
            return pb.PathDone()

        return await self._call(context, request.sandbox_id, request.source, body)

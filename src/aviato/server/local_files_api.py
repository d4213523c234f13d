"""The lean socket's local-only methods (service `aviato.local.v1.LocalFiles`, not in the
proto: a descriptor cannot cross gRPC): a sandbox's file handed to a client on this machine as
a descriptor (`LeanContext.send_descriptor`), so that its bytes move between the sandbox's file
and the client's in the kernel, never through the service (docs/internals/transport.md).

- OpenForReading (ReadFileRequest → FileInfo): the file, opened for reading by the sandbox's
  supervisor as ReadFile opens it.
- OpenForWriting (WriteFileRequest stream → WriteFileResponse stream): the header; then the
  descriptor of a new temporary file, or for a file kept in memory the write end of a pipe the
  sandbox's supervisor drains into one (so that the sandbox's memory limit counts its bytes:
  the header must then say the size), and an empty response ("write now"); the client writes
  and sends the end frame; the file is renamed into place (only with exactly the header's
  size, when said) and the last response gives its size. A client that goes away before the
  end frame (its connection ends) leaves no file.

UNIMPLEMENTED ("stream it: ...") means "use ReadFile / WriteFile": a file that is not regular
with a size, one kept in memory written without a size in the header, a node or a supervisor
that hands out no descriptors. Otherwise the errors of ReadFile and WriteFile, for
the same owner checks.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from aviato.runtime.base import FileWriteDescriptor, SandboxGone, SandboxRuntimeError, Unsupported
from aviato.server import errors, validation
from aviato.server.errors import InvalidArgument, ServiceError
from aviato.server.files_api import first_header, write_target
from aviato.server.servicer import ServicerBase
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = ["LOCAL_FILES", "LocalFiles", "local_file_handlers"]

LOCAL_FILES = "aviato.local.v1.LocalFiles"


def local_file_handlers(servicer: LocalFiles) -> dict[str, Any]:
    """The methods of LOCAL_FILES, as `add_registered_method_handlers` takes them."""
    return {
        "OpenForReading": grpc.unary_unary_rpc_method_handler(
            servicer.OpenForReading,
            request_deserializer=pb.ReadFileRequest.FromString,
            response_serializer=pb.FileInfo.SerializeToString,
        ),
        "OpenForWriting": grpc.stream_stream_rpc_method_handler(
            servicer.OpenForWriting,
            request_deserializer=pb.WriteFileRequest.FromString,
            response_serializer=pb.WriteFileResponse.SerializeToString,
        ),
    }


class LocalFiles(ServicerBase):
    """OpenForReading and OpenForWriting (see the module docstring)."""

    async def OpenForReading(self, request: pb.ReadFileRequest, context: Ctx) -> pb.FileInfo:
        owner = await self._owner_or_abort(context)
        try:
            path = validation.validate_path(request.path, "path")
            handle = await self._lifecycle.running_handle(owner, request.sandbox_id)
            with self._lifecycle.activity(request.sandbox_id):  # for idle_timeout
                fd, info = await handle.open_for_reading(path)
        except (Unsupported, SandboxGone) as e:  # Gone: maybe a supervisor older than the frame
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"stream it: {e}")
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=request.sandbox_id, path=request.path)
        try:
            await context.send_descriptor(fd)  # type: ignore[attr-defined]  # LeanContext's
        finally:
            os.close(fd)
        return pb.FileInfo(size=info.size, mode=info.mode)

    async def OpenForWriting(
        self, request_iterator: AsyncIterator[pb.WriteFileRequest], context: Ctx
    ) -> None:
        owner = await self._owner_or_abort(context)
        requests = aiter(request_iterator)
        header = pb.WriteFileHeader()
        try:
            header = await first_header(requests)
            path, mode = write_target(header)
            size = header.size or None  # 0: not said (a file kept in memory is then streamed)
            handle = await self._lifecycle.running_handle(owner, header.sandbox_id)
            write = await handle.open_for_writing(path, mode, header.make_parents, size)
        except (Unsupported, SandboxGone) as e:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"stream it: {e}")
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=header.sandbox_id, path=header.path)
        try:
            with self._lifecycle.activity(header.sandbox_id):
                size = await _written(write, requests, context)
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=header.sandbox_id, path=header.path)
        await context.write(pb.WriteFileResponse(size=size))


async def _written(
    write: FileWriteDescriptor, requests: AsyncIterator[pb.WriteFileRequest], context: Ctx
) -> int:
    """Hands the write's descriptor over, waits for the client's end frame and puts the file in
    place; its size. Anything else (the client gone, a stray frame) drops the write."""
    try:
        await context.send_descriptor(write.fd)  # type: ignore[attr-defined]  # LeanContext's
        await context.write(pb.WriteFileResponse(size=0))  # write now
        end = await anext(requests, None)
        if end is None or end.WhichOneof("msg") != "end" or not end.end:
            raise InvalidArgument("end", "the stream ended before its end frame: nothing written")
        if await anext(requests, None) is not None:
            raise InvalidArgument("msg", "unexpected frame after the end frame")
        return await write.commit()
    except BaseException:
        write.abort()
        raise

"""The readers of the service's server streams over gRPC: a file or tree read (`GrpcFileReader`)
and the messages of a log or pull stream (`GrpcStreamReader`), their errors mapped."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

from aviato._transport.base import FileReader, LogReader, PullReader
from aviato._transport.grpc_errors import mapped as _mapped
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["PATH_OPS", "GrpcFileReader", "GrpcStreamReader"]

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]

# The directory calls, as their errors name them.
PATH_OPS = {
    "StatPath": "stat",
    "ListDir": "list directory",
    "RemovePath": "remove",
    "MakeDir": "make directory",
    "RenamePath": "rename",
}


class GrpcFileReader(FileReader):
    def __init__(self, call: Any, info: pb.FileInfo, sandbox_id: str, path: str) -> None:
        self._call = call
        self.size = info.size
        self.mode = info.mode
        self._sandbox_id = sandbox_id
        self._path = path
        self._ended = False

    async def next(self) -> bytes | None:
        if self._ended:
            return None
        try:
            msg = await self._call.read()
        except grpc.RpcError as err:
            self._ended = True
            raise _mapped(err, "read file", self._sandbox_id, self._path) from None
        if msg is _EOF:
            self._ended = True
            return None
        data: bytes = msg.data
        return data

    def cancel(self) -> None:
        if not self._ended:
            self._ended = True
            self._call.cancel()


class GrpcStreamReader(LogReader, PullReader):
    """A server stream's messages (logs, pull progress), its errors mapped."""

    def __init__(self, call: Any, op: str, sandbox_id: str | None = None) -> None:
        self._call = call
        self._op = op
        self._sandbox_id = sandbox_id
        self._ended = False

    async def next(self) -> Any:
        if self._ended:
            return None
        try:
            msg = await self._call.read()
        except grpc.RpcError as err:
            self._ended = True
            raise _mapped(err, self._op, self._sandbox_id) from None
        if msg is _EOF:
            self._ended = True
            return None
        return msg

    def cancel(self) -> None:
        if not self._ended:
            self._ended = True
            self._call.cancel()

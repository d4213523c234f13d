"""Directory calls of a sandbox on another node: `path_op`, `read_file_at`, `write_file_at`.

They travel over the node host's direct gRPC channel (execwire.py), the path `read_file` and
`write_file` take: `PathOp` (unary), `ReadFileAt` (the info, then 1 MiB data frames) and
`WriteFileAt` (the header, data frames, then `end`: a stream without `end` leaves no file), in
node.proto's last block. The node host runs them on its own handle of the sandbox, whose
supervisor does the work with the walls of the local service (nothing followed below a root,
native/dirs.c); nothing here interprets a path. Memory: one frame in flight per direction
beyond gRPC's own flow-control window, on both sides.

There is no fallback through Ray actor calls: a node host without a direct channel answers
these calls Unsupported, in words (exec and single files still go through Ray there).
Runtime errors come back as the runtime's own classes (by their gRPC code), so that the service
gives them the same reason (FILE_NOT_FOUND, PATH_INVALID, ...) as on a local node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from aviato.cluster import codec
from aviato.cluster.execwire import EOF, FILE_CHUNK_BYTES, SERVICE, TOKEN_HEADER
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import (
    FileInfo,
    FileNotFound,
    PathOp,
    PathOpResult,
    PathRefused,
    PermissionRefused,
    SandboxGone,
    SandboxHandle,
    SandboxRuntimeError,
    Unsupported,
)

if TYPE_CHECKING:
    from aviato.cluster.execwire import ExecServer
    from aviato.cluster.link import NodeLink

__all__ = ["path_handlers", "remote_path_op", "remote_read_file_at", "remote_write_file_at"]

PATH_OP_METHOD = f"/{SERVICE}/PathOp"
READ_AT_METHOD = f"/{SERVICE}/ReadFileAt"
WRITE_AT_METHOD = f"/{SERVICE}/WriteFileAt"
WRITE_BATCH_BYTES = 1 << 20
# The error classes whose reason the service tells apart, by the code they travel with.
_BY_CODE: dict[str, type[SandboxRuntimeError]] = {
    "NOT_FOUND": FileNotFound,
    "INVALID_ARGUMENT": PathRefused,
    "PERMISSION_DENIED": PermissionRefused,
}


# --- the node host's side ----------------------------------------------------------------------


def path_handlers(
    server: ExecServer, handle_of: Callable[[str], Awaitable[SandboxHandle]]
) -> dict[str, Any]:
    """The direct channel's directory methods, for `ExecServer(more_handlers=...)`."""

    async def path_op(request: npb.PathOpRequest, context: Any) -> npb.PathOpResponse:
        await server.authorize(context)
        try:
            handle = await handle_of(request.sandbox_id)
            result = await handle.path_op(codec.decode_path_op(request))
        except SandboxRuntimeError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        return codec.encode_path_result(result)

    async def read_at(
        request: npb.ReadFileAtRequest, context: Any
    ) -> AsyncIterator[npb.ReadFileResponse]:
        await server.authorize(context)
        try:
            handle = await handle_of(request.sandbox_id)
            info, chunks = await handle.read_file_at(request.root, request.rel)
        except SandboxRuntimeError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        yield npb.ReadFileResponse(info=codec.encode_file_info(info))
        batch = bytearray()
        async for chunk in chunks:
            batch += chunk
            if len(batch) >= FILE_CHUNK_BYTES:
                yield npb.ReadFileResponse(data=bytes(batch))
                batch.clear()
        if batch:
            yield npb.ReadFileResponse(data=bytes(batch))

    async def write_at(
        requests: AsyncIterator[npb.WriteFileAtRequest], context: Any
    ) -> npb.WriteFileResponse:
        await server.authorize(context)
        requests = aiter(requests)
        header = (await anext(requests)).header

        async def chunks() -> AsyncIterator[bytes]:
            async for request in requests:
                if request.WhichOneof("frame") == "end":
                    return
                yield request.data
            raise SandboxRuntimeError("the upload ended before its end frame")

        mtime = header.mtime_ns if header.HasField("mtime_ns") else None
        try:
            handle = await handle_of(header.sandbox_id)
            size = await handle.write_file_at(header.root, header.rel, header.mode, mtime, chunks())
        except SandboxRuntimeError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        return npb.WriteFileResponse(size=size)

    return {
        "PathOp": grpc.unary_unary_rpc_method_handler(
            path_op,
            request_deserializer=npb.PathOpRequest.FromString,
            response_serializer=npb.PathOpResponse.SerializeToString,
        ),
        "ReadFileAt": grpc.unary_stream_rpc_method_handler(
            read_at,
            request_deserializer=npb.ReadFileAtRequest.FromString,
            response_serializer=npb.ReadFileResponse.SerializeToString,
        ),
        "WriteFileAt": grpc.stream_unary_rpc_method_handler(
            write_at,
            request_deserializer=npb.WriteFileAtRequest.FromString,
            response_serializer=npb.WriteFileResponse.SerializeToString,
        ),
    }


# --- the control plane's side ------------------------------------------------------------------


def _channel(link: NodeLink, sandbox_id: str) -> Any:
    channel = link.exec_channel()
    if channel is None:
        raise Unsupported(
            f"sandbox {sandbox_id}: its node has no direct channel, which directory calls need"
        )
    return channel


def typed(error: SandboxRuntimeError, node_id: str) -> SandboxRuntimeError:
    """A node host's error as the runtime class of its code, without the node's prefix; an
    UNIMPLEMENTED answer (a node host of an older release) in words."""
    message = str(error).removeprefix(f"node host on {node_id[:12]}: ")
    if error.code == "UNIMPLEMENTED":
        return Unsupported(
            f"the node host on {node_id[:12]} is of an older aviato release without this call: "
            "run the same release on every node"
        )
    cls = _BY_CODE.get(error.code)
    return error if cls is None or isinstance(error, cls) else cls(message)


async def _guarded(link: NodeLink, awaitable: Awaitable[Any]) -> Any:
    """`link.race(awaitable)` with the error typed; a channel that does not answer is
    reported to the link (which asks the node host where its channel is now)."""
    try:
        return await link.race(awaitable)
    except SandboxGone as e:
        if "does not answer" in str(e):
            link.channel_failed()
        raise
    except SandboxRuntimeError as e:
        raise typed(e, link.node_id) from e


async def remote_path_op(link: NodeLink, sandbox_id: str, op: PathOp) -> PathOpResult:
    channel = _channel(link, sandbox_id)
    call = channel.unary_unary(
        PATH_OP_METHOD,
        request_serializer=npb.PathOpRequest.SerializeToString,
        response_deserializer=npb.PathOpResponse.FromString,
    )
    request = codec.encode_path_op(sandbox_id, op)
    response = await _guarded(
        link, _await(call(request, metadata=((TOKEN_HEADER, link.exec_token),)))
    )
    return codec.decode_path_result(response)


async def remote_read_file_at(
    link: NodeLink, sandbox_id: str, root: str, rel: str
) -> tuple[FileInfo, AsyncIterator[bytes]]:
    channel = _channel(link, sandbox_id)
    method = channel.unary_stream(
        READ_AT_METHOD,
        request_serializer=npb.ReadFileAtRequest.SerializeToString,
        response_deserializer=npb.ReadFileResponse.FromString,
    )
    call = method(
        npb.ReadFileAtRequest(sandbox_id=sandbox_id, root=root, rel=rel),
        metadata=((TOKEN_HEADER, link.exec_token),),
    )
    try:
        first = await _guarded(link, call.read())
    except BaseException:
        call.cancel()
        raise
    if first is EOF or first.WhichOneof("frame") != "info":
        call.cancel()
        raise SandboxRuntimeError(f"read {rel}: the node host sent no file info")

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while (frame := await _guarded(link, call.read())) is not EOF:
                yield frame.data
        finally:
            call.cancel()

    return codec.decode_file_info(first.info), chunks()


async def remote_write_file_at(
    link: NodeLink,
    sandbox_id: str,
    root: str,
    rel: str,
    mode: int,
    mtime_ns: int | None,
    chunks: AsyncIterator[bytes],
) -> int:
    channel = _channel(link, sandbox_id)
    method = channel.stream_unary(
        WRITE_AT_METHOD,
        request_serializer=npb.WriteFileAtRequest.SerializeToString,
        response_deserializer=npb.WriteFileResponse.FromString,
    )
    call = method(metadata=((TOKEN_HEADER, link.exec_token),))
    header = npb.WriteFileAtHeader(sandbox_id=sandbox_id, root=root, rel=rel, mode=mode)
    if mtime_ns is not None:
        header.mtime_ns = mtime_ns
    try:
        await _guarded(link, call.write(npb.WriteFileAtRequest(header=header)))
        batch = bytearray()
        async for chunk in chunks:
            batch += chunk
            if len(batch) >= WRITE_BATCH_BYTES:
                await _guarded(link, call.write(npb.WriteFileAtRequest(data=bytes(batch))))
                batch.clear()
        if batch:
            await _guarded(link, call.write(npb.WriteFileAtRequest(data=bytes(batch))))
        await _guarded(link, call.write(npb.WriteFileAtRequest(end=True)))
        await _guarded(link, call.done_writing())
        response = await _guarded(link, _await(call))
    except BaseException:
        call.cancel()  # no end frame: the node host leaves no file
        raise
    return int(response.size)


async def _await(ref: Any) -> Any:
    return await ref

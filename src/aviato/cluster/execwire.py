"""The direct channel: gRPC streams from the control plane to a node host for exec and files.

Exec is the hot path, and a Ray streaming generator costs more than a gRPC stream: 2.4 ms p50
for a two-frame generator against 0.67 ms for the same frames over one persistent gRPC channel
(`python -m benchmarks.cluster_transport`, docs/cluster.md); file transfers as one Ray object per
MiB reached 46-71 MiB/s here, over gRPC 218-313 MiB/s. So each node host also serves
`aviato.node.v1.NodeHost` on its node's IP (a port the kernel picks), in the node protocol's
messages (aviato/node/v1/node.proto, converted by codec.py):
- `Exec` (bidirectional): an `ExecRequest` with `start`, then stdin / stdin_eof / resize / signal
  frames; answered with `ExecEvent` output events and exactly one exit or failed event.
  Cancelling the call kills the command.
- `ReadFile`: a `ReadFileRequest`; answered with the info frame, then data frames of 1 MiB.
- `WriteFile`: the header, data frames, then the end frame; a stream without the end frame
  leaves no file.
- `ConnectPort` (bidirectional): one TCP connection to a port inside a sandbox, relayed
  (port_relay.py).
- `PathOp`, `ReadFileAt`, `WriteFileAt` (node_paths.py) and `ExportSnapshot`,
  `ImportSnapshot` (node_snapshots.py), added by `more_handlers`.
Runtime errors end the call with their gRPC code (NOT_FOUND, PERMISSION_DENIED, ...).

Who may call: the node host makes a random token when it starts and hands it (with the address)
to the control plane through Ray, whose own connections carry Ray's cluster token; a call
without it ends PERMISSION_DENIED. The channel is plaintext, like Ray's own traffic between
nodes, so it belongs on the cluster's private network; sandboxes cannot reach it (they have no
network interface but loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from aviato.cluster import codec
from aviato.cluster.port_relay import serve_connect_port
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import (
    ExecFailed,
    ExecHandle,
    ExecOutput,
    ExecSpec,
    SandboxHandle,
    SandboxRuntimeError,
)

__all__ = [
    "EOF",
    "METHOD",
    "ExecServer",
    "open_connect_port",
    "open_exec",
    "read_file",
    "start_frame",
    "write_file",
]

SERVICE = "aviato.node.v1.NodeHost"
METHOD = f"/{SERVICE}/Exec"
READ_METHOD = f"/{SERVICE}/ReadFile"
WRITE_METHOD = f"/{SERVICE}/WriteFile"
CONNECT_PORT_METHOD = f"/{SERVICE}/ConnectPort"
FILE_CHUNK_BYTES = 1 << 20
TOKEN_HEADER = "x-aviato-node-token"
EOF: Any = getattr(grpc.aio, "EOF", None)  # what a call's read() returns after its last response


def start_frame(sandbox_id: str, spec: ExecSpec) -> npb.ExecRequest:
    """The first frame of an exec call."""
    return npb.ExecRequest(start=npb.ExecStart(sandbox_id=sandbox_id, spec=codec.encode_spec(spec)))


# --- the node host's side ----------------------------------------------------------------------


class ExecServer:
    """Serves the exec method for the sandboxes that `handle_of(sandbox_id)` finds."""

    def __init__(
        self,
        handle_of: Callable[[str], Awaitable[SandboxHandle]],
        token: str | None = None,
        more_handlers: Callable[[ExecServer], dict[str, Any]] | None = None,
    ) -> None:
        """`more_handlers(server)`: further methods of the service (node_paths.py,
        node_snapshots.py), each of which calls `server.authorize` first."""
        self._handle_of = handle_of
        self.token = token or secrets.token_hex(32)
        self._server: Any = None
        self._more_handlers = more_handlers

    async def start(self, host: str, port: int = 0) -> str:
        """Listens on host:port (0: a port the kernel picks); returns "host:port"."""
        handlers = {
            "Exec": grpc.stream_stream_rpc_method_handler(
                self._exec,
                request_deserializer=npb.ExecRequest.FromString,
                response_serializer=npb.ExecEvent.SerializeToString,
            ),
            "ReadFile": grpc.unary_stream_rpc_method_handler(
                self._read_file,
                request_deserializer=npb.ReadFileRequest.FromString,
                response_serializer=npb.ReadFileResponse.SerializeToString,
            ),
            "WriteFile": grpc.stream_unary_rpc_method_handler(
                self._write_file,
                request_deserializer=npb.WriteFileRequest.FromString,
                response_serializer=npb.WriteFileResponse.SerializeToString,
            ),
            "ConnectPort": grpc.stream_stream_rpc_method_handler(
                self._connect_port,
                request_deserializer=npb.PortFrame.FromString,
                response_serializer=npb.PortFrame.SerializeToString,
            ),
        }
        if self._more_handlers is not None:
            handlers.update(self._more_handlers(self))
        generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
        self._server = grpc.aio.server(
            options=[
                # The largest frame received is an exec's start: its spec payload (JSON: a
                # 2 MiB argv and env may take 12 MiB) and a sandbox id.
                ("grpc.max_receive_message_length", codec.MAX_SPEC_PAYLOAD + (64 << 10)),
                ("grpc.max_send_message_length", 8 << 20),
            ]
        )
        self._server.add_generic_rpc_handlers((generic,))
        bound = self._server.add_insecure_port(f"{host}:{port}")
        if not bound:
            self._server = None
            raise OSError(f"cannot listen on {host}:{port}")
        port = bound
        await self._server.start()
        return f"{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(1.0)

    async def authorize(self, context: Any) -> None:
        """Ends the call PERMISSION_DENIED unless it carries this node host's token."""
        await self._authorize(context)

    async def _authorize(self, context: Any) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if not hmac.compare_digest(str(metadata.get(TOKEN_HEADER, "")), self.token):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not the control plane")

    async def _connect_port(self, requests: AsyncIterator[npb.PortFrame], context: Any) -> None:
        await self._authorize(context)
        await serve_connect_port(self._handle_of, requests, context)

    async def _read_file(
        self, request: npb.ReadFileRequest, context: Any
    ) -> AsyncIterator[npb.ReadFileResponse]:
        await self._authorize(context)
        try:
            handle = await self._handle_of(request.sandbox_id)
            info, chunks = await handle.read_file(request.path)
        except SandboxRuntimeError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        yield npb.ReadFileResponse(info=npb.FileInfo(size=info.size, mode=info.mode))
        batch = bytearray()
        async for chunk in chunks:
            batch += chunk
            if len(batch) >= FILE_CHUNK_BYTES:
                yield npb.ReadFileResponse(data=bytes(batch))
                batch.clear()
        if batch:
            yield npb.ReadFileResponse(data=bytes(batch))

    async def _write_file(
        self, requests: AsyncIterator[npb.WriteFileRequest], context: Any
    ) -> npb.WriteFileResponse:
        await self._authorize(context)
        requests = aiter(requests)
        header = (await anext(requests)).header
        ended = False

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal ended
            async for request in requests:
                if request.WhichOneof("frame") == "end":
                    ended = True
                    return
                yield request.data
            # The stream ended without "end": the control plane went away mid-upload.
            raise SandboxRuntimeError("the upload ended before its end frame")

        try:
            handle = await self._handle_of(header.sandbox_id)
            size = await handle.write_file(header.path, header.mode, header.make_parents, chunks())
        except SandboxRuntimeError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        return npb.WriteFileResponse(size=size)

    async def _exec(
        self, requests: AsyncIterator[npb.ExecRequest], context: Any
    ) -> AsyncIterator[npb.ExecEvent]:
        await self._authorize(context)
        requests = aiter(requests)
        first = await anext(requests)
        try:
            handle = await self._handle_of(first.start.sandbox_id)
            proc = await handle.exec(codec.decode_spec(first.start.spec))
        except SandboxRuntimeError as e:
            yield codec.encode_event(ExecFailed(e.code, str(e)))
            return
        pump = asyncio.create_task(_pump(requests, proc))
        done = False
        try:
            async for event in proc.events():
                yield codec.encode_event(event)
                if not isinstance(event, ExecOutput):
                    done = True
                    return
        finally:
            pump.cancel()
            if not done:  # the control plane went away: nobody reads the command any more
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.kill())


async def _pump(requests: AsyncIterator[npb.ExecRequest], proc: ExecHandle) -> None:
    async for request in requests:
        kind = request.WhichOneof("frame")
        if kind == "stdin":
            await proc.write_stdin(request.stdin)
        elif kind == "stdin_eof":
            await proc.close_stdin()
        elif kind == "resize":
            await proc.resize(request.resize.rows, request.resize.cols)
        elif kind == "signal":
            await proc.signal(request.signal)


# --- the control plane's side ------------------------------------------------------------------


def open_exec(channel: Any, token: str) -> Any:
    """A new exec call on a node host's grpc.aio channel (write `start_frame` next)."""
    call: Any = channel.stream_stream(
        METHOD,
        request_serializer=npb.ExecRequest.SerializeToString,
        response_deserializer=npb.ExecEvent.FromString,
    )
    return call(metadata=((TOKEN_HEADER, token),))


def read_file(channel: Any, token: str, sandbox_id: str, path: str) -> Any:
    """A ReadFile call: its first response is the info, then data."""
    call: Any = channel.unary_stream(
        READ_METHOD,
        request_serializer=npb.ReadFileRequest.SerializeToString,
        response_deserializer=npb.ReadFileResponse.FromString,
    )
    return call(
        npb.ReadFileRequest(sandbox_id=sandbox_id, path=path), metadata=((TOKEN_HEADER, token),)
    )


def open_connect_port(channel: Any, token: str) -> Any:
    """A ConnectPort call (port_relay.py): write the first frame, then relay."""
    call: Any = channel.stream_stream(
        CONNECT_PORT_METHOD,
        request_serializer=npb.PortFrame.SerializeToString,
        response_deserializer=npb.PortFrame.FromString,
    )
    return call(metadata=((TOKEN_HEADER, token),))


def write_file(channel: Any, token: str) -> Any:
    """A WriteFile call: write the header, data frames and the end frame, then await it."""
    call: Any = channel.stream_unary(
        WRITE_METHOD,
        request_serializer=npb.WriteFileRequest.SerializeToString,
        response_deserializer=npb.WriteFileResponse.FromString,
    )
    return call(metadata=((TOKEN_HEADER, token),))

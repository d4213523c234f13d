"""The gRPC transport: the service over a unix socket, plaintext TCP or TCP+TLS.

- Addresses: ``unix:///abs/path.sock``; ``http://host[:port]`` (plaintext, port 80 by default);
  ``https://host[:port]`` (TLS with the system roots, or the CA bundle named by `AVIATO_TLS_CA`;
  port 443 by default). `parse_base_url` checks them.
- `AVIATO_API_KEY` travels as ``authorization: Bearer <key>`` metadata on every call.
- Errors: gRPC failures become `aviato.exceptions` in one place, `grpc_errors.translate_error`,
  through `aviato._transport.errors.from_status` with the `ErrorDetail` of the status's trailing
  metadata. Nothing above this module sees a grpc type.
- ForwardPort: `aviato._transport.grpc_port` (a forwarded connection and its credit).
- Exec: a command without interactive stdin runs over RunCommand (one request, then output
  frames); one with stdin or a tty over an Exec stream (init, stdin frames, ``stdin_eof``,
  ``resize``, ``signal``).
  A service older than RunCommand answers UNIMPLEMENTED before the command started: the call is
  then made again over Exec (input sent as stdin frames), and so are all later ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
import grpc.aio

from aviato._defaults import ENV_TLS_CA
from aviato._transport.address import Target, parse_base_url
from aviato._transport.base import (
    ExecCall,
    ExecFrame,
    FileReader,
    LogReader,
    PortStream,
    PullReader,
    Transport,
)
from aviato._transport.errors import from_status
from aviato._transport.grpc_errors import mapped as _mapped
from aviato._transport.grpc_errors import translate_error
from aviato._transport.grpc_port import GrpcPortStream
from aviato._transport.grpc_snapshots import SnapshotCalls
from aviato.exceptions import AviatoError, SandboxExecutionError
from aviato.v1 import admin_pb2 as apb
from aviato.v1 import admin_pb2_grpc, images_pb2_grpc, sandbox_pb2_grpc
from aviato.v1 import images_pb2 as ipb
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["GrpcTransport", "Target", "parse_base_url", "translate_error"]

FILE_CHUNK_BYTES = 256 * 1024
STDIN_CHUNK_BYTES = 64 * 1024
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
]
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


# --- the transport ----------------------------------------------------------------------------


class GrpcTransport(SnapshotCalls, Transport):
    """A grpc.aio channel to one address, bound to the event loop that made it."""

    def __init__(self, url: str, *, api_key: str | None = None) -> None:
        target = parse_base_url(url)
        self.url = target.url
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        if target.secure:
            ca_file = os.environ.get(ENV_TLS_CA)
            root = None
            if ca_file:
                with open(ca_file, "rb") as f:
                    root = f.read()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = grpc.aio.secure_channel(target.target, creds, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target.target, options=_CHANNEL_OPTIONS)
        self._stub = sandbox_pb2_grpc.SandboxServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._images = images_pb2_grpc.ImageServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._admin = admin_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]
        self._closed = False
        #: False once the service answered RunCommand with UNIMPLEMENTED (an older service).
        self.run_command = True

    def __repr__(self) -> str:
        return f"<GrpcTransport {self.url}>"

    @property
    def closed(self) -> bool:
        return self._closed

    async def _unary(
        self,
        method: Any,
        request: Any,
        call_timeout: float | None,
        op: str,
        sandbox_id: str | None = None,
    ) -> Any:
        try:
            return await method(request, timeout=call_timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            raise _mapped(err, op, sandbox_id) from None

    async def create_sandbox(
        self, request: pb.CreateSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        record: pb.Sandbox = await self._unary(
            self._stub.CreateSandbox, request, call_timeout, "create sandbox"
        )
        return record

    async def get_sandbox(self, sandbox_id: str, *, call_timeout: float | None) -> pb.Sandbox:
        record: pb.Sandbox = await self._unary(
            self._stub.GetSandbox,
            pb.GetSandboxRequest(sandbox_id=sandbox_id),
            call_timeout,
            "get sandbox",
            sandbox_id,
        )
        return record

    async def set_network(
        self, request: pb.SetNetworkRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        record: pb.Sandbox = await self._unary(
            self._stub.SetNetwork, request, call_timeout, "set network", request.sandbox_id
        )
        return record

    async def list_sandboxes(
        self, request: pb.ListSandboxesRequest, *, call_timeout: float | None
    ) -> pb.ListSandboxesResponse:
        page: pb.ListSandboxesResponse = await self._unary(
            self._stub.ListSandboxes, request, call_timeout, "list sandboxes"
        )
        return page

    async def wait_sandbox(
        self, request: pb.WaitSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        record: pb.Sandbox = await self._unary(
            self._stub.WaitSandbox, request, call_timeout, "wait", request.sandbox_id
        )
        return record

    async def stop_sandbox(
        self, sandbox_id: str, grace_seconds: float, *, call_timeout: float | None
    ) -> pb.Sandbox:
        record: pb.Sandbox = await self._unary(
            self._stub.StopSandbox,
            pb.StopSandboxRequest(sandbox_id=sandbox_id, grace_seconds=grace_seconds),
            call_timeout,
            "stop sandbox",
            sandbox_id,
        )
        return record

    async def delete_sandbox(self, sandbox_id: str, *, call_timeout: float | None) -> None:
        await self._unary(
            self._stub.DeleteSandbox,
            pb.DeleteSandboxRequest(sandbox_id=sandbox_id),
            call_timeout,
            "delete sandbox",
            sandbox_id,
        )

    async def renew_lease(
        self, lease_id: str, ttl_seconds: float, *, call_timeout: float | None
    ) -> None:
        await self._unary(
            self._stub.RenewLease,
            pb.RenewLeaseRequest(lease_id=lease_id, ttl_seconds=ttl_seconds),
            call_timeout,
            "renew lease",
        )

    async def release_lease(
        self, lease_id: str, *, stop_sandboxes: bool, call_timeout: float | None
    ) -> None:
        await self._unary(
            self._stub.ReleaseLease,
            pb.ReleaseLeaseRequest(lease_id=lease_id, stop_sandboxes=stop_sandboxes),
            call_timeout,
            "release lease",
        )

    async def server_info(self, *, call_timeout: float | None) -> pb.ServerInfo:
        info: pb.ServerInfo = await self._unary(
            self._stub.GetServerInfo, pb.GetServerInfoRequest(), call_timeout, "get server info"
        )
        return info

    async def exec(self, init: pb.ExecInit, *, call_timeout: float | None) -> ExecCall:
        return _GrpcExecCall(self, init, call_timeout)

    async def open_read(
        self, sandbox_id: str, path: str, *, call_timeout: float | None
    ) -> FileReader:
        call = self._stub.ReadFile(
            pb.ReadFileRequest(sandbox_id=sandbox_id, path=path),
            timeout=call_timeout,
            metadata=self.metadata,
        )
        try:
            first = await call.read()
        except grpc.RpcError as err:
            call.cancel()
            raise _mapped(err, "read file", sandbox_id, path) from None
        except BaseException:
            call.cancel()
            raise
        if first is _EOF or first.WhichOneof("msg") != "info":
            call.cancel()
            raise from_status(
                "DATA_LOSS",
                "the service sent no file header",
                op="read file",
                sandbox_id=sandbox_id,
                filepath=path,
            )
        return _GrpcFileReader(call, first.info, sandbox_id, path)

    async def write_file(
        self, header: pb.WriteFileHeader, data: memoryview, *, call_timeout: float | None
    ) -> int:
        async def frames() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(header=header)
            for i in range(0, len(data), FILE_CHUNK_BYTES):
                yield pb.WriteFileRequest(data=bytes(data[i : i + FILE_CHUNK_BYTES]))
            yield pb.WriteFileRequest(end=True)

        try:
            response = await self._stub.WriteFile(
                frames(), timeout=call_timeout, metadata=self.metadata
            )
        except grpc.RpcError as err:
            raise _mapped(err, "write file", header.sandbox_id, header.path) from None
        size: int = response.size
        return size

    async def write_file_chunks(
        self,
        header: pb.WriteFileHeader,
        chunks: AsyncIterator[bytes],
        *,
        call_timeout: float | None,
    ) -> int:
        async def frames() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(header=header)
            async for chunk in chunks:
                for i in range(0, len(chunk), FILE_CHUNK_BYTES):
                    yield pb.WriteFileRequest(data=chunk[i : i + FILE_CHUNK_BYTES])
            yield pb.WriteFileRequest(end=True)  # without it the service keeps nothing

        try:
            response = await self._stub.WriteFile(
                frames(), timeout=call_timeout, metadata=self.metadata
            )
        except grpc.RpcError as err:
            raise _mapped(err, "write file", header.sandbox_id, header.path) from None
        size: int = response.size
        return size

    async def create_key(
        self, request: apb.CreateKeyRequest, *, call_timeout: float | None
    ) -> apb.CreateKeyResponse:
        created: apb.CreateKeyResponse = await self._unary(
            self._admin.CreateKey, request, call_timeout, "create key"
        )
        return created

    async def list_keys(
        self, request: apb.ListKeysRequest, *, call_timeout: float | None
    ) -> list[apb.ApiKey]:
        response = await self._unary(self._admin.ListKeys, request, call_timeout, "list keys")
        return list(response.keys)

    async def revoke_key(self, key_id: str, *, call_timeout: float | None) -> None:
        request = apb.RevokeKeyRequest(key_id=key_id)
        await self._unary(self._admin.RevokeKey, request, call_timeout, "revoke key")

    async def get_owner_quotas(
        self, owner: str | None, *, call_timeout: float | None
    ) -> list[apb.OwnerQuota]:
        request = apb.GetOwnerQuotasRequest(owner=owner)
        response = await self._unary(
            self._admin.GetOwnerQuotas, request, call_timeout, "get quotas"
        )
        return list(response.quotas)

    async def set_owner_quota(
        self, quota: apb.OwnerQuota, *, call_timeout: float | None
    ) -> apb.OwnerQuota:
        request = apb.SetOwnerQuotaRequest(quota=quota)
        stored: apb.OwnerQuota = await self._unary(
            self._admin.SetOwnerQuota, request, call_timeout, "set quota"
        )
        return stored

    async def open_logs(
        self, request: pb.StreamLogsRequest, *, call_timeout: float | None
    ) -> LogReader:
        call = self._stub.StreamLogs(request, timeout=call_timeout, metadata=self.metadata)
        return _GrpcStreamReader(call, "stream logs", request.sandbox_id)

    async def forward_port(
        self, sandbox_id: str, port: int, *, call_timeout: float | None
    ) -> PortStream:
        call = self._stub.ForwardPort(metadata=self.metadata, timeout=call_timeout)
        stream = GrpcPortStream(call, sandbox_id, port)
        try:
            await stream.open()
        except BaseException:
            stream.cancel()
            raise
        return stream

    async def pull_image(
        self, request: ipb.PullImageRequest, *, call_timeout: float | None
    ) -> PullReader:
        call = self._images.PullImage(request, timeout=call_timeout, metadata=self.metadata)
        return _GrpcStreamReader(call, f"pull {request.image}")

    async def list_images(self, *, call_timeout: float | None) -> list[ipb.Image]:
        response = await self._unary(
            self._images.ListImages, ipb.ListImagesRequest(), call_timeout, "list images"
        )
        return list(response.images)

    async def remove_image(self, image: str, *, call_timeout: float | None) -> ipb.Image:
        response = await self._unary(
            self._images.RemoveImage,
            ipb.RemoveImageRequest(image=image),
            call_timeout,
            f"remove {image}",
        )
        removed: ipb.Image = response.image
        return removed

    async def prune_images(self, *, call_timeout: float | None) -> list[ipb.Image]:
        response = await self._unary(
            self._images.PruneImages, ipb.PruneImagesRequest(), call_timeout, "prune images"
        )
        return list(response.removed)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                await self._channel.close(grace=None)


class _GrpcFileReader(FileReader):
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


class _GrpcStreamReader(LogReader, PullReader):
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


# --- exec -------------------------------------------------------------------------------------


class _GrpcExecCall(ExecCall):
    """RunCommand when stdin is not interactive, else an Exec stream (see the module)."""

    def __init__(
        self, transport: GrpcTransport, init: pb.ExecInit, call_timeout: float | None
    ) -> None:
        self._transport = transport
        self._init = init
        self._timeout = call_timeout
        self._command = list(init.argv)
        self._write_lock = asyncio.Lock()
        self._pending: asyncio.Future[Any] | None = None
        self._exited = False
        self._streaming = init.stdin or init.tty or not transport.run_command
        self._opened: asyncio.Task[None] | None = None
        if self._streaming:
            self._call: Any = self._open_stream()
        else:
            self._call = transport._stub.RunCommand(
                init, metadata=transport.metadata, timeout=call_timeout
            )

    def _open_stream(self) -> Any:
        call = self._transport._stub.Exec(metadata=self._transport.metadata, timeout=self._timeout)
        self._opened = asyncio.ensure_future(self._send_init(call))
        return call

    async def _send_init(self, call: Any) -> None:
        """Sends the init (and, for an older service, the input as stdin frames). A failure
        here is the call's: its reader reports it."""
        with contextlib.suppress(Exception):
            await self._write_init(call)

    async def _write_init(self, call: Any) -> None:
        init = self._init
        async with self._write_lock:
            data = init.input if not init.stdin else b""
            if data:  # Exec takes input in frames (an older service ignores init.input)
                first = pb.ExecInit()
                first.CopyFrom(init)
                first.input = b""
                first.stdin = True
                await call.write(pb.ExecRequest(init=first))
                for i in range(0, len(data), STDIN_CHUNK_BYTES):
                    await call.write(pb.ExecRequest(stdin=data[i : i + STDIN_CHUNK_BYTES]))
                await call.write(pb.ExecRequest(stdin_eof=True))
            else:
                await call.write(pb.ExecRequest(init=init))

    def _error(self, err: grpc.RpcError) -> BaseException:
        return _mapped(err, "exec", self._init.sandbox_id)

    async def read(self) -> ExecFrame:
        while True:
            # The read runs as a future of its own, shielded: cancelling the caller must not
            # cancel it (grpc would end the call before `kill` could signal the command).
            if self._pending is None:
                self._pending = asyncio.ensure_future(self._call.read())
            try:
                msg = await asyncio.shield(self._pending)
            except grpc.RpcError as err:
                self._pending = None
                if not self._streaming and err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # A service older than RunCommand: the command never started.
                    self._transport.run_command = False
                    self._streaming = True
                    self._call = self._open_stream()
                    continue
                self._exited = True
                raise self._error(err) from None
            self._pending = None
            if msg is _EOF:
                self._exited = True
                raise SandboxExecutionError(
                    f"the output stream of {shlex.join(self._command)!r} ended without an exit "
                    "status (connection to the service lost?)",
                    sandbox_id=self._init.sandbox_id,
                )
            kind = msg.WhichOneof("msg")
            if kind == "output":
                output: pb.ExecOutput = msg.output
                return output
            if kind == "exit":
                self._exited = True
                exit_frame: pb.ExecExit = msg.exit
                return exit_frame
            if kind == "error":
                self._exited = True
                error: pb.ExecError = msg.error
                raise from_status(
                    error.code,
                    error.message,
                    error.detail if error.HasField("detail") else None,
                    op="exec",
                    sandbox_id=self._init.sandbox_id,
                )
            # "started" and frames of a newer service: skip

    async def _write(self, request: pb.ExecRequest) -> None:
        if not self._streaming:
            raise SandboxExecutionError("this command was started without stdin")
        if self._opened is not None:
            await self._opened
        control = request.WhichOneof("msg") != "stdin"
        try:
            async with self._write_lock:
                if self._call.done() and control:
                    # The command is over: an end-of-file, resize or signal has nothing left to
                    # reach, and writing to a finished call can fail it after the fact.
                    return
                await self._call.write(request)
        except grpc.RpcError as err:
            raise self._error(err) from None
        except AviatoError:
            raise
        except Exception as err:  # e.g. writing to a call that already ended
            raise SandboxExecutionError(f"the stdin stream broke: {err}") from None

    async def write_stdin(self, data: bytes) -> None:
        for i in range(0, len(data), STDIN_CHUNK_BYTES):
            await self._write(pb.ExecRequest(stdin=data[i : i + STDIN_CHUNK_BYTES]))

    async def close_stdin(self) -> None:
        await self._write(pb.ExecRequest(stdin_eof=True))

    async def resize(self, rows: int, cols: int) -> None:
        await self._write(pb.ExecRequest(resize=pb.TerminalSize(rows=rows, cols=cols)))

    async def send_signal(self, signum: int) -> None:
        await self._write(pb.ExecRequest(signal=signum))

    async def kill(self) -> None:
        call = self._call
        if self._streaming and not self._exited:
            # RunCommand: cancelling the call kills the command; Exec: signal it first
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(1.0), self._write_lock:
                    await call.write(pb.ExecRequest(signal=9))
        call.cancel()
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()

    def release(self) -> None:
        if self._streaming:
            # The exit frame is final: the stream's trailers are collected in the background.
            _spawn(self._end_stream())

    async def _end_stream(self) -> None:
        # After the exit frame: half-close, let the server end the stream, else cancel it.
        call = self._call
        try:
            async with asyncio.timeout(5.0):
                if self._opened is not None:
                    await self._opened
                async with self._write_lock:
                    await call.done_writing()
                while await call.read() is not _EOF:
                    pass
        except BaseException:
            call.cancel()


_background: set[asyncio.Task[None]] = set()


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    """Runs `coro` as a task that is kept alive until it ends (asyncio holds tasks weakly)."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)

"""The gRPC transport: the service over a unix socket, plaintext TCP or TCP+TLS.

- Addresses: ``unix:///abs/path.sock``; ``http://host[:port]`` (plaintext, port 80 by default);
  ``https://host[:port]`` (TLS with the system roots, or the CA bundle named by `AVIATO_TLS_CA`;
  port 443 by default). `parse_base_url` checks them.
- `AVIATO_API_KEY` travels as ``authorization: Bearer <key>`` metadata on every call.
- Errors: gRPC failures become `aviato.exceptions` in one place, `grpc_errors.translate_error`,
  through `aviato._transport.errors.from_status` with the `ErrorDetail` of the status's trailing
  metadata. Nothing above this module sees a grpc type.
- ForwardPort: `aviato._transport.grpc_port` (a forwarded connection and its credit).
- Exec: `aviato._transport.grpc_exec` (RunCommand, or an Exec stream for stdin and terminals).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from aviato._defaults import ENV_TLS_CA
from aviato._transport.address import Target, parse_base_url
from aviato._transport.base import (
    ExecCall,
    FileReader,
    FileWriter,
    LogReader,
    PortStream,
    PullReader,
    Transport,
)
from aviato._transport.errors import from_status
from aviato._transport.grpc_errors import mapped as _mapped
from aviato._transport.grpc_errors import translate_error
from aviato._transport.grpc_exec import GrpcExecCall
from aviato._transport.grpc_pause import GrpcPauseCalls
from aviato._transport.grpc_port import GrpcPortStream
from aviato._transport.grpc_readers import PATH_OPS, GrpcFileReader, GrpcStreamReader
from aviato._transport.grpc_secrets import SecretCalls
from aviato._transport.grpc_snapshots import SnapshotCalls
from aviato._transport.lean_channel import LeanChannel
from aviato._transport.lean_descriptors import (
    DescriptorFileReader,
    open_for_reading,
    open_for_writing,
)
from aviato._transport.local_choice import lean_socket_for
from aviato.v1 import admin_pb2 as apb
from aviato.v1 import admin_pb2_grpc, images_pb2_grpc, sandbox_pb2_grpc
from aviato.v1 import images_pb2 as ipb
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["GrpcTransport", "Target", "parse_base_url", "translate_error"]

FILE_CHUNK_BYTES = 256 * 1024
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
]
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


# --- the transport ----------------------------------------------------------------------------


class GrpcTransport(GrpcPauseCalls, SnapshotCalls, SecretCalls, Transport):
    """A grpc.aio channel to one address, bound to the event loop that made it."""

    def __init__(self, url: str, *, api_key: str | None = None) -> None:
        target = parse_base_url(url)
        self.url = target.url
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        if target.secure:
            ca_file = os.environ.get(ENV_TLS_CA)
            root = None
            if ca_file:
                with open(ca_file, "rb") as f:
                    root = f.read()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel: Any = grpc.aio.secure_channel(
                target.target, creds, options=_CHANNEL_OPTIONS
            )
        elif (lean_socket := lean_socket_for(target)) is not None:
            self._channel = LeanChannel(lean_socket)  # same surface: see local_choice
        else:
            self._channel = grpc.aio.insecure_channel(target.target, options=_CHANNEL_OPTIONS)
        self._stub = sandbox_pb2_grpc.SandboxServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._images = images_pb2_grpc.ImageServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._admin = admin_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]
        self._closed = False
        #: False once the lean socket's service knows no OpenForReading (an older service).
        self._descriptors = True
        #: False once the service answered RunCommand with UNIMPLEMENTED (an older service).
        self.run_command = True

    def __repr__(self) -> str:
        lean = " (lean)" if isinstance(self._channel, LeanChannel) else ""
        return f"<GrpcTransport {self.url}{lean}>"

    @property
    def closed(self) -> bool:
        return self._closed

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
        return GrpcExecCall(self, init, call_timeout)

    async def attach(self, attach: pb.ExecAttach, *, call_timeout: float | None) -> ExecCall:
        init = pb.ExecInit(sandbox_id=attach.sandbox_id, stdin=True)
        return GrpcExecCall(self, init, call_timeout, attach)

    async def list_execs(self, sandbox_id: str, *, call_timeout: float | None) -> list[pb.ExecInfo]:
        request = pb.ListExecsRequest(sandbox_id=sandbox_id)
        answer: pb.ListExecsResponse = await self._unary(
            self._stub.ListExecs, request, call_timeout, "list commands", sandbox_id
        )
        return list(answer.execs)

    async def signal_exec(
        self, request: pb.SignalExecRequest, *, call_timeout: float | None
    ) -> pb.ExecInfo:
        info: pb.ExecInfo = await self._unary(
            self._stub.SignalExec, request, call_timeout, "signal command", request.sandbox_id
        )
        return info

    async def open_read(
        self, sandbox_id: str, path: str, *, call_timeout: float | None
    ) -> FileReader:
        if isinstance(self._channel, LeanChannel) and self._descriptors:
            request = pb.ReadFileRequest(sandbox_id=sandbox_id, path=path)
            try:
                fd, info = await open_for_reading(
                    self._channel.path, request, self.metadata, call_timeout
                )
                return DescriptorFileReader(fd, info)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise _mapped(err, "read file", sandbox_id, path) from None
                # Stream this one; an older service (no such method) streams every one.
                self._descriptors = "stream it" in (err.details() or "")
        return await self._open_read(self._stub.ReadFile, sandbox_id, path, call_timeout)

    async def open_tree_read(
        self, sandbox_id: str, path: str, *, call_timeout: float | None
    ) -> FileReader:
        return await self._open_read(self._stub.DownloadTree, sandbox_id, path, call_timeout)

    async def path_call(self, rpc: str, request: Any, *, call_timeout: float | None) -> Any:
        path = getattr(request, "path", "") or getattr(request, "source", "")
        try:
            return await getattr(self._stub, rpc)(
                request, timeout=call_timeout, metadata=self.metadata
            )
        except grpc.RpcError as err:
            raise _mapped(err, PATH_OPS[rpc], request.sandbox_id, path) from None

    async def write_tree(
        self,
        header: pb.WriteFileHeader,
        chunks: AsyncIterator[bytes],
        *,
        call_timeout: float | None,
    ) -> int:
        return await self._write_chunks(self._stub.UploadTree, header, chunks, call_timeout)

    async def _open_read(
        self, method: Any, sandbox_id: str, path: str, call_timeout: float | None
    ) -> FileReader:
        call = method(
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
        return GrpcFileReader(call, first.info, sandbox_id, path)

    async def open_write(
        self, header: pb.WriteFileHeader, *, call_timeout: float | None
    ) -> FileWriter | None:
        if not (isinstance(self._channel, LeanChannel) and self._descriptors):
            return None
        try:
            return await open_for_writing(
                self._channel.path,
                header,
                self.metadata,
                call_timeout,
                lambda err: _mapped(err, "write file", header.sandbox_id, header.path),
            )
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise _mapped(err, "write file", header.sandbox_id, header.path) from None
            self._descriptors = "stream it" in (err.details() or "")
            return None

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
        return await self._write_chunks(self._stub.WriteFile, header, chunks, call_timeout)

    async def _write_chunks(
        self,
        method: Any,
        header: pb.WriteFileHeader,
        chunks: AsyncIterator[bytes],
        call_timeout: float | None,
    ) -> int:
        async def frames() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(header=header)
            async for chunk in chunks:
                for i in range(0, len(chunk), FILE_CHUNK_BYTES):
                    yield pb.WriteFileRequest(data=chunk[i : i + FILE_CHUNK_BYTES])
            yield pb.WriteFileRequest(end=True)  # without it the service keeps nothing

        try:
            response = await method(frames(), timeout=call_timeout, metadata=self.metadata)
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
        return GrpcStreamReader(call, "stream logs", request.sandbox_id)

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
        return GrpcStreamReader(call, f"pull {request.image}")

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

    async def list_volumes(self, *, call_timeout: float | None) -> list[pb.Volume]:
        request, op = pb.ListVolumesRequest(), "list volumes"
        return list((await self._unary(self._stub.ListVolumes, request, call_timeout, op)).volumes)

    async def delete_volume(self, name: str, *, call_timeout: float | None) -> None:
        request, op = pb.DeleteVolumeRequest(name=name), f"delete volume {name}"
        await self._unary(self._stub.DeleteVolume, request, call_timeout, op)

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

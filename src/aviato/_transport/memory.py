"""An in-memory transport: a small service in pure Python, for tests of the SDK's own logic.

`MemoryService` keeps sandboxes, leases and files in dicts and runs no process. Its commands
are a tiny vocabulary: ``echo ARGS...``, ``exit N`` (writes ``bye`` to stderr), ``cat`` (copies
stdin), ``yes`` (N lines of output given by ``yes N``), ``sleep S``, ``winsize`` (a terminal
program: answers each input chunk with its window size, ``ROWS COLS``; see `resizes`). Every
exposed port of a running sandbox is an echo server (`forward_port`: what is written is read
back, and a half-close is answered with one). Every
failure is reported the way a real service does, as a status code plus an `ErrorDetail`, and
goes through the same mapping (`aviato._transport.errors.from_status`) as the gRPC transport's.

A test scripts the failures a real service rarely shows on demand through `MemoryService.faults`
(calls that find the service unreachable, a create whose answer is lost after it was committed,
an exec stream without an exit frame, an error frame) and reads what happened in
`MemoryService.calls`. Serve it with ``aviato._client.register_transport(url, svc.transport)``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator

from aviato._transport.base import (
    ExecCall,
    FileReader,
    LogReader,
    PortStream,
    PullReader,
    Transport,
)
from aviato._transport.errors import from_status
from aviato._transport.memory_streams import (
    Faults,
    MemoryEchoPort,
    MemoryExecCall,
    MemoryFileReader,
    MemoryLogReader,
    MemoryPullReader,
    MemorySandbox,
)
from aviato.v1 import admin_pb2 as apb
from aviato.v1 import errors_pb2 as epb
from aviato.v1 import images_pb2 as ipb
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["Faults", "MemoryService", "MemoryTransport"]

_CHUNK = 256 * 1024
_RUNNING = pb.SANDBOX_STATUS_RUNNING
_TERMINATED = pb.SANDBOX_STATUS_TERMINATED
_PAUSED = pb.SANDBOX_STATUS_PAUSED


class MemoryService:
    """The state of one fake service (see the module docstring)."""

    def __init__(self, name: str = "test") -> None:
        self.url = f"memory://{name}"
        self.faults = Faults()
        self.calls: Counter[str] = Counter()
        self.sandboxes: dict[str, MemorySandbox] = {}
        self.by_request: dict[str, str] = {}
        self.leases: dict[str, float] = {}
        self.signals: list[int] = []
        #: the terminal sizes (rows, cols) that commands were resized to, in order
        self.resizes: list[tuple[int, int]] = []
        #: the image store, by digest: `pull` adds, `remove`/`prune` take away
        self.images: dict[str, ipb.Image] = {}
        #: the caller's volumes (by name)
        self.volumes: dict[str, pb.Volume] = {}
        #: the Admin API's keys (by id) and owners' quotas (by owner)
        self.keys: dict[str, apb.ApiKey] = {}
        self.quotas: dict[str, apb.OwnerQuota] = {}
        self._ids = itertools.count(1)

    def transport(self) -> MemoryTransport:
        """A new connection to this service (what a transport factory returns)."""
        return MemoryTransport(self)

    # -- failures, as a real service reports them ---------------------------------------------

    def _enter(self, name: str, op: str) -> None:
        self.calls[name] += 1
        if self.faults.unavailable > 0:
            self.faults.unavailable -= 1
            raise from_status("UNAVAILABLE", "connection refused", op=op)

    def _sandbox(self, sandbox_id: str, op: str, *, running: bool = False) -> MemorySandbox:
        found = self.sandboxes.get(sandbox_id)
        if found is None:
            raise from_status(
                "NOT_FOUND",
                f"sandbox {sandbox_id!r} not found",
                epb.ErrorDetail(reason=epb.SANDBOX_NOT_FOUND, sandbox_id=sandbox_id),
                op=op,
            )
        if running and found.record.status != _RUNNING:
            raise from_status(
                "FAILED_PRECONDITION",
                f"sandbox {sandbox_id} is {pb.SandboxStatus.Name(found.record.status)}",
                epb.ErrorDetail(reason=epb.SANDBOX_NOT_RUNNING, sandbox_id=sandbox_id),
                op=op,
            )
        return found

    def log(self, sandbox_id: str, data: bytes, *, stderr: bool = False) -> None:
        """Appends an entry to the main process's log (call from the SDK's loop while a follow
        is open, e.g. through ``get_bridge().call_soon``)."""
        entry = pb.LogEntry(stream=pb.STREAM_STDERR if stderr else pb.STREAM_STDOUT, data=data)
        entry.time.GetCurrentTime()
        self.sandboxes[sandbox_id].logs.append(entry)

    def stop(self, sandbox_id: str) -> None:
        """Ends a sandbox as its lease or lifetime would (exit code 143)."""
        record = self.sandboxes[sandbox_id].record
        record.status = _TERMINATED
        record.exit_code = 143


class MemoryTransport(Transport):
    """A connection to a `MemoryService`."""

    def __init__(self, service: MemoryService) -> None:
        self.service = service
        self.url = service.url
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self._closed = True

    async def create_sandbox(
        self, request: pb.CreateSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        svc = self.service
        svc._enter("CreateSandbox", "create sandbox")
        if not request.request_id:
            raise from_status(
                "INVALID_ARGUMENT",
                "request_id: required",
                epb.ErrorDetail(reason=epb.FIELD_INVALID, field="request_id"),
                op="create sandbox",
            )
        sandbox_id = svc.by_request.get(request.request_id)
        if sandbox_id is None:
            sandbox_id = f"mem-{next(svc._ids)}"
            record = pb.Sandbox(
                id=sandbox_id, status=_RUNNING, spec=request.spec, lease_id=request.lease_id
            )
            svc.sandboxes[sandbox_id] = MemorySandbox(record)
            svc.by_request[request.request_id] = sandbox_id
            if request.lease_id:
                svc.leases[request.lease_id] = request.lease_ttl_seconds
        if svc.faults.create_answer_lost > 0:
            svc.faults.create_answer_lost -= 1
            raise from_status("UNAVAILABLE", "the answer was lost", op="create sandbox")
        return svc.sandboxes[sandbox_id].record

    async def get_sandbox(self, sandbox_id: str, *, call_timeout: float | None) -> pb.Sandbox:
        self.service._enter("GetSandbox", "get sandbox")
        return self.service._sandbox(sandbox_id, "get sandbox").record

    async def set_network(
        self, request: pb.SetNetworkRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        self.service._enter("SetNetwork", "set network")
        box = self.service._sandbox(request.sandbox_id, "set network")
        box.record.spec.egress_mode = request.egress_mode
        del box.record.spec.egress[:]
        box.record.spec.egress.extend(request.egress)
        return box.record

    async def pause_sandbox(
        self, request: pb.PauseSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        self.service._enter("PauseSandbox", "pause sandbox")
        found = self.service._sandbox(request.sandbox_id, "pause sandbox")
        if found.record.status not in (_RUNNING, _PAUSED):
            raise from_status(
                "FAILED_PRECONDITION",
                f"sandbox {request.sandbox_id} has ended; only a live sandbox can be paused",
                epb.ErrorDetail(reason=epb.SANDBOX_NOT_RUNNING, sandbox_id=request.sandbox_id),
                op="pause sandbox",
            )
        found.record.status = _PAUSED
        return found.record

    async def resume_sandbox(
        self, request: pb.ResumeSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        self.service._enter("ResumeSandbox", "resume sandbox")
        found = self.service._sandbox(request.sandbox_id, "resume sandbox")
        if found.record.status == _PAUSED:
            found.record.status = _RUNNING
        return found.record

    async def extend_sandbox(
        self, request: pb.ExtendSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        self.service._enter("ExtendSandbox", "extend sandbox")
        found = self.service._sandbox(request.sandbox_id, "extend sandbox")
        if found.record.HasField("expires_at"):
            ns = found.record.expires_at.ToNanoseconds() + int(request.seconds * 1e9)
            found.record.expires_at.FromNanoseconds(ns)
        return found.record

    async def list_sandboxes(
        self, request: pb.ListSandboxesRequest, *, call_timeout: float | None
    ) -> pb.ListSandboxesResponse:
        self.service._enter("ListSandboxes", "list sandboxes")
        found = [
            s.record
            for s in self.service.sandboxes.values()
            if set(request.tags) <= set(s.record.spec.tags)
            and (request.include_terminated or s.record.status == _RUNNING)
        ]
        return pb.ListSandboxesResponse(sandboxes=found)

    async def wait_sandbox(
        self, request: pb.WaitSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        self.service._enter("WaitSandbox", "wait")
        return self.service._sandbox(request.sandbox_id, "wait").record

    async def stop_sandbox(
        self, sandbox_id: str, grace_seconds: float, *, call_timeout: float | None
    ) -> pb.Sandbox:
        self.service._enter("StopSandbox", "stop sandbox")
        found = self.service._sandbox(sandbox_id, "stop sandbox")
        if found.record.status == _RUNNING:
            self.service.stop(sandbox_id)
        return found.record

    async def delete_sandbox(self, sandbox_id: str, *, call_timeout: float | None) -> None:
        self.service._enter("DeleteSandbox", "delete sandbox")
        self.service._sandbox(sandbox_id, "delete sandbox")
        del self.service.sandboxes[sandbox_id]

    async def renew_lease(
        self, lease_id: str, ttl_seconds: float, *, call_timeout: float | None
    ) -> None:
        self.service._enter("RenewLease", "renew lease")
        self.service.leases[lease_id] = ttl_seconds

    async def release_lease(
        self, lease_id: str, *, stop_sandboxes: bool, call_timeout: float | None
    ) -> None:
        svc = self.service
        svc._enter("ReleaseLease", "release lease")
        svc.leases.pop(lease_id, None)
        if stop_sandboxes:
            for sandbox_id, found in svc.sandboxes.items():
                if found.record.lease_id == lease_id and found.record.status == _RUNNING:
                    svc.stop(sandbox_id)

    async def server_info(self, *, call_timeout: float | None) -> pb.ServerInfo:
        self.service._enter("GetServerInfo", "get server info")
        return pb.ServerInfo(version="memory", placement="memory")

    async def exec(self, init: pb.ExecInit, *, call_timeout: float | None) -> ExecCall:
        self.service._enter("Exec", "exec")
        return MemoryExecCall(self.service, init)

    async def open_read(
        self, sandbox_id: str, path: str, *, call_timeout: float | None
    ) -> FileReader:
        self.service._enter("ReadFile", "read file")
        found = self.service._sandbox(sandbox_id, "read file", running=True)
        data = found.files.get(path)
        if data is None:
            raise from_status(
                "NOT_FOUND",
                f"{path}: no such file",
                epb.ErrorDetail(reason=epb.FILE_NOT_FOUND, sandbox_id=sandbox_id, path=path),
                op="read file",
                sandbox_id=sandbox_id,
                filepath=path,
            )
        return MemoryFileReader(data)

    async def write_file_chunks(
        self,
        header: pb.WriteFileHeader,
        chunks: AsyncIterator[bytes],
        *,
        call_timeout: float | None,
    ) -> int:
        self.service._enter("WriteFile", "write file")
        found = self.service._sandbox(header.sandbox_id, "write file", running=True)
        data = b"".join([chunk async for chunk in chunks])
        found.files[header.path] = data
        return len(data)

    async def forward_port(
        self, sandbox_id: str, port: int, *, call_timeout: float | None
    ) -> PortStream:
        self.service._enter("ForwardPort", "forward port")
        found = self.service._sandbox(sandbox_id, "forward port", running=True)
        if port not in found.record.spec.exposed_ports:
            raise from_status(
                "INVALID_ARGUMENT",
                f"sandbox {sandbox_id} does not expose port {port}",
                epb.ErrorDetail(reason=epb.FIELD_INVALID, sandbox_id=sandbox_id, field="port"),
                op="forward port",
            )
        return MemoryEchoPort()

    async def pull_image(
        self, request: ipb.PullImageRequest, *, call_timeout: float | None
    ) -> PullReader:
        self.service._enter("PullImage", f"pull {request.image}")
        digest = "sha256:" + hashlib.sha256(request.image.encode()).hexdigest()
        image = ipb.Image(names=[request.image], digest=digest, size=1024, node="local")
        image.pulled_at.GetCurrentTime()
        self.service.images[digest] = image
        return MemoryPullReader(
            [
                ipb.PullImageProgress(phase="resolving"),
                ipb.PullImageProgress(phase="downloading", digest=digest, current=1024, total=1024),
                ipb.PullImageProgress(phase="done", digest=digest, image=image),
            ]
        )

    async def list_images(self, *, call_timeout: float | None) -> list[ipb.Image]:
        self.service._enter("ListImages", "list images")
        return list(self.service.images.values())

    async def remove_image(self, image: str, *, call_timeout: float | None) -> ipb.Image:
        self.service._enter("RemoveImage", f"remove {image}")
        for digest, found in self.service.images.items():
            if image == digest or image in found.names:
                return self.service.images.pop(digest)
        raise from_status("NOT_FOUND", f"no image {image!r}", op=f"remove {image}")

    async def list_volumes(self, *, call_timeout: float | None) -> list[pb.Volume]:
        self.service._enter("ListVolumes", "list volumes")
        return list(self.service.volumes.values())

    async def delete_volume(self, name: str, *, call_timeout: float | None) -> None:
        self.service._enter("DeleteVolume", f"delete volume {name}")
        if self.service.volumes.pop(name, None) is None:
            raise from_status("NOT_FOUND", f"volume {name!r} not found", op=f"delete volume {name}")

    async def prune_images(self, *, call_timeout: float | None) -> list[ipb.Image]:
        self.service._enter("PruneImages", "prune images")
        unused = [image for image in self.service.images.values() if not image.in_use]
        for image in unused:
            del self.service.images[image.digest]
        return unused

    async def create_key(
        self, request: apb.CreateKeyRequest, *, call_timeout: float | None
    ) -> apb.CreateKeyResponse:
        self.service._enter("CreateKey", "create key")
        if not request.owner:
            raise from_status("INVALID_ARGUMENT", "owner: must not be empty", op="create key")
        key = apb.ApiKey(id=f"key_{next(self.service._ids):012x}", owner=request.owner,
                         name=request.name)  # fmt: skip
        key.created_at.GetCurrentTime()
        self.service.keys[key.id] = key
        return apb.CreateKeyResponse(key=key, secret=f"avt_memory_{key.id}")

    async def list_keys(
        self, request: apb.ListKeysRequest, *, call_timeout: float | None
    ) -> list[apb.ApiKey]:
        self.service._enter("ListKeys", "list keys")
        wanted = request.owner if request.HasField("owner") else None
        return [k for k in self.service.keys.values() if wanted in (None, k.owner)]

    async def revoke_key(self, key_id: str, *, call_timeout: float | None) -> None:
        self.service._enter("RevokeKey", "revoke key")
        key = self.service.keys.get(key_id)
        if key is None or key.revoked:
            raise from_status("NOT_FOUND", f"no active key {key_id!r}", op="revoke key")
        key.revoked = True

    async def get_owner_quotas(
        self, owner: str | None, *, call_timeout: float | None
    ) -> list[apb.OwnerQuota]:
        self.service._enter("GetOwnerQuotas", "get quotas")
        if owner is not None:
            return [self.service.quotas.get(owner, apb.OwnerQuota(owner=owner))]
        return [self.service.quotas[o] for o in sorted(self.service.quotas)]

    async def set_owner_quota(
        self, quota: apb.OwnerQuota, *, call_timeout: float | None
    ) -> apb.OwnerQuota:
        self.service._enter("SetOwnerQuota", "set quota")
        self.service.quotas[quota.owner] = quota
        return quota

    async def open_logs(
        self, request: pb.StreamLogsRequest, *, call_timeout: float | None
    ) -> LogReader:
        self.service._enter("StreamLogs", "stream logs")
        return MemoryLogReader(self.service, request)

    async def write_file(
        self, header: pb.WriteFileHeader, data: memoryview, *, call_timeout: float | None
    ) -> int:
        self.service._enter("WriteFile", "write file")
        found = self.service._sandbox(header.sandbox_id, "write file", running=True)
        found.files[header.path] = bytes(data)
        return len(data)

"""The snapshot, fork and usage calls of the gRPC transport (a base class of `GrpcTransport`)."""

from __future__ import annotations

from aviato._transport.grpc_unary import UnaryCalls
from aviato.v1 import sandbox_pb2 as pb


class SnapshotCalls(UnaryCalls):
    """CreateSnapshot, ListSnapshots, DeleteSnapshot, ForkSandbox and SandboxUsage over `_stub`."""

    async def create_snapshot(
        self, request: pb.CreateSnapshotRequest, *, call_timeout: float | None
    ) -> pb.Snapshot:
        answer: pb.Snapshot = await self._unary(
            self._stub.CreateSnapshot, request, call_timeout, "snapshot sandbox", request.sandbox_id
        )
        return answer

    async def list_snapshots(
        self, request: pb.ListSnapshotsRequest, *, call_timeout: float | None
    ) -> pb.ListSnapshotsResponse:
        answer: pb.ListSnapshotsResponse = await self._unary(
            self._stub.ListSnapshots, request, call_timeout, "list snapshots"
        )
        return answer

    async def delete_snapshot(
        self, request: pb.DeleteSnapshotRequest, *, call_timeout: float | None
    ) -> pb.DeleteSnapshotResponse:
        answer: pb.DeleteSnapshotResponse = await self._unary(
            self._stub.DeleteSnapshot, request, call_timeout, "delete snapshot"
        )
        return answer

    async def fork_sandbox(
        self, request: pb.ForkSandboxRequest, *, call_timeout: float | None
    ) -> pb.ForkSandboxResponse:
        answer: pb.ForkSandboxResponse = await self._unary(
            self._stub.ForkSandbox, request, call_timeout, "fork sandbox", request.sandbox_id
        )
        return answer

    async def sandbox_usage(
        self, request: pb.SandboxUsageRequest, *, call_timeout: float | None
    ) -> pb.SandboxUsageResponse:
        answer: pb.SandboxUsageResponse = await self._unary(
            self._stub.SandboxUsage, request, call_timeout, "sandbox usage", request.sandbox_id
        )
        return answer

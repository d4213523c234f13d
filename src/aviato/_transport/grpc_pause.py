"""The gRPC transport's calls that pause, resume and extend a sandbox (a base of
`GrpcTransport`; `_unary` is `grpc_unary`'s)."""

from __future__ import annotations

from aviato._transport.grpc_unary import UnaryCalls
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["GrpcPauseCalls"]


class GrpcPauseCalls(UnaryCalls):
    """PauseSandbox, ResumeSandbox, ExtendSandbox."""

    async def pause_sandbox(
        self, request: pb.PauseSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        record: pb.Sandbox = await self._unary(
            self._stub.PauseSandbox, request, call_timeout, "pause sandbox", request.sandbox_id
        )
        return record

    async def resume_sandbox(
        self, request: pb.ResumeSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        record: pb.Sandbox = await self._unary(
            self._stub.ResumeSandbox, request, call_timeout, "resume sandbox", request.sandbox_id
        )
        return record

    async def extend_sandbox(
        self, request: pb.ExtendSandboxRequest, *, call_timeout: float | None
    ) -> pb.Sandbox:
        record: pb.Sandbox = await self._unary(
            self._stub.ExtendSandbox, request, call_timeout, "extend sandbox", request.sandbox_id
        )
        return record

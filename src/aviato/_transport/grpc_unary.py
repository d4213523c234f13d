"""The one way the gRPC transport makes a unary call: `UnaryCalls._unary`, with the call's
metadata and the errors mapped in `grpc_errors` (a base of `GrpcTransport` and of the groups of
calls kept in modules of their own, `grpc_pause`, `grpc_snapshots`)."""

from __future__ import annotations

from typing import Any

import grpc

from aviato._transport.grpc_errors import mapped
from aviato.v1 import sandbox_pb2_grpc

__all__ = ["UnaryCalls"]


class UnaryCalls:
    """`_unary` over `_stub` with `metadata`; the transport sets both."""

    _stub: sandbox_pb2_grpc.SandboxServiceStub
    metadata: tuple[tuple[str, str], ...]

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
            raise mapped(err, op, sandbox_id) from None

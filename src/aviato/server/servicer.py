"""What the servicers of aviato.v1.SandboxService share: the lifecycle, the caller's owner, and
the translation of errors into gRPC statuses.

Error translation happens in `grpc_status` and only there: `errors.ServiceError` and
`runtime.base.SandboxRuntimeError` carry a grpc status code name; anything else is a bug, logged
with its traceback and reported as INTERNAL. No request can crash the service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from aviato.server.auth import Authenticator
from aviato.server.errors import ServiceError
from aviato.server.lifecycle import Lifecycle

__all__ = ["Ctx", "ServicerBase", "grpc_status"]

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]


def grpc_status(code: str) -> grpc.StatusCode:
    """The status of an error's code name (`ServiceError.code`, `SandboxRuntimeError.code`)."""
    status: grpc.StatusCode = getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)
    return status


class ServicerBase:
    """The lifecycle and the authenticator, and who is calling."""

    def __init__(self, lifecycle: Lifecycle, auth: Authenticator) -> None:
        self._lifecycle = lifecycle
        self._auth = auth

    def owner(self, context: Ctx) -> str:
        return self._auth.owner_of(context.peer(), context.invocation_metadata())

    async def _owner_or_abort(self, context: Ctx) -> str:
        try:
            return self.owner(context)
        except ServiceError as e:
            await context.abort(grpc_status(e.code), str(e))
            raise  # unreachable: abort raises

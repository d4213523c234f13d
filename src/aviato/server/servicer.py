"""What the servicers of aviato.v1.SandboxService share: the lifecycle and the caller's owner.

Errors reach the wire through `errors.abort` / `errors.error_frame` only (status code, message
and ErrorDetail): `errors.ServiceError` and `runtime.base.SandboxRuntimeError` carry a status
code name; anything else is a bug, logged with its traceback and reported as INTERNAL. No
request can crash the service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from aviato.server import errors
from aviato.server.auth import Authenticator
from aviato.server.errors import ServiceError
from aviato.server.lifecycle import Lifecycle

__all__ = ["Ctx", "ServicerBase"]

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]


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
            await errors.abort(context, e)

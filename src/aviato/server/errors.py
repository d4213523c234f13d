"""The service's typed errors, and their one translation to the wire.

Modules of the service raise `ServiceError`s (each carries its gRPC status code name and an
`ErrorDetail` of errors.proto: a reason and the subject, such as the sandbox or field concerned);
the runtime raises `aviato.runtime.base.SandboxRuntimeError`s (a code; their reason follows from
their class). Only this module turns them into what a client receives:

- `abort(context, exc)`: ends a call with the status code, the (bounded) message, and the detail
  as binary trailing metadata (`aviato.v1.error_detail`);
- `error_frame(code, message, detail)`: Exec's in-stream error frame, with the same detail.

Anything else that escapes to the servicers is a bug, reported as INTERNAL with a logged
traceback. Clients map errors by code and detail; the message is for people and never parsed.
"""

from __future__ import annotations

from typing import Any, NoReturn, TypeAlias

import grpc

from aviato.runtime.base import (
    FileNotFound,
    LimitsUnavailable,
    PathRefused,
    PermissionRefused,
    SandboxGone,
    SandboxRuntimeError,
)
from aviato.server.metrics import EXEC_ERRORS
from aviato.v1 import error_detail
from aviato.v1 import errors_pb2 as epb
from aviato.v1 import sandbox_pb2 as pb

__all__ = [
    "MAX_MESSAGE_CHARS",
    "AlreadyExists",
    "CapacityExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "Reason",
    "SandboxNotFound",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "abort",
    "bounded",
    "detail_of",
    "error_frame",
    "grpc_status",
]


Reason: TypeAlias = epb.ErrorReason

# A status message travels in the `grpc-message` trailer, percent-encoded (up to 12 bytes per
# character), and clients refuse trailers beyond 16 KiB: a message that quotes a huge request
# value would turn the intended status into RESOURCE_EXHAUSTED on the client.
MAX_MESSAGE_CHARS = 512
# The subject strings of a detail travel in a trailer too.
_MAX_SUBJECT_CHARS = 1024


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message`, cut to `limit` characters (saying how much was cut)."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message) - limit} more characters)"


class ServiceError(Exception):
    """Base of the service's errors. `code` is a grpc.StatusCode name; `detail` is what the
    client gets to act on: the reason (default: the class's `reason`) and the subject.

    The message is bounded (see `bounded`): it may quote request values of any size.
    """

    code = "INTERNAL"
    reason: Reason = epb.ERROR_REASON_UNSPECIFIED

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        sandbox_id: str = "",
        path: str = "",
        field: str = "",
        lease_id: str = "",
    ) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message
        self.detail = epb.ErrorDetail(
            reason=type(self).reason if reason is None else reason,
            sandbox_id=sandbox_id[:_MAX_SUBJECT_CHARS],
            path=path[:_MAX_SUBJECT_CHARS],
            field=field[:_MAX_SUBJECT_CHARS],
            lease_id=lease_id[:_MAX_SUBJECT_CHARS],
        )


class InvalidArgument(ServiceError):
    """A request field is invalid. The message starts with the field's path ("spec.env: ...")."""

    code = "INVALID_ARGUMENT"
    reason = epb.FIELD_INVALID

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field=field)
        self.field = field


class NotFound(ServiceError):
    """Unknown id, or an id that belongs to another owner (the two are indistinguishable)."""

    code = "NOT_FOUND"


class SandboxNotFound(NotFound):
    """No sandbox with this id (for this owner)."""

    reason = epb.SANDBOX_NOT_FOUND

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id!r} not found", sandbox_id=sandbox_id)


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class CapacityExceeded(ServiceError):
    code = "RESOURCE_EXHAUSTED"
    reason = epb.CAPACITY_EXHAUSTED


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"
    reason = epb.CREDENTIALS_INVALID


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


# --- to the wire ------------------------------------------------------------------------------

# The runtime's errors: their reason follows from their class (most specific first).
_RUNTIME_REASONS: tuple[tuple[type[SandboxRuntimeError], Reason], ...] = (
    (FileNotFound, epb.FILE_NOT_FOUND),
    (PathRefused, epb.PATH_INVALID),
    (PermissionRefused, epb.FILE_PERMISSION_DENIED),
    (SandboxGone, epb.SANDBOX_NOT_RUNNING),
    (LimitsUnavailable, epb.RUNTIME_FAILED),
)


def detail_of(
    exc: ServiceError | SandboxRuntimeError, *, sandbox_id: str = "", path: str = ""
) -> epb.ErrorDetail:
    """The ErrorDetail of an error; `sandbox_id`/`path` fill a runtime error's subject (the
    runtime does not know which request it serves)."""
    if isinstance(exc, ServiceError):
        return exc.detail
    reason: Reason | None = getattr(type(exc), "reason", None)  # a class may declare its own
    if reason is None:
        reason = next(
            (r for cls, r in _RUNTIME_REASONS if isinstance(exc, cls)), epb.ERROR_REASON_UNSPECIFIED
        )
    return epb.ErrorDetail(
        reason=reason,
        sandbox_id=sandbox_id[:_MAX_SUBJECT_CHARS],
        path=path[:_MAX_SUBJECT_CHARS],
    )


def grpc_status(code: str) -> grpc.StatusCode:
    """The grpc.StatusCode of a code name (INTERNAL for an unknown one)."""
    status: grpc.StatusCode = getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)
    return status


async def abort(
    context: Any,
    exc: ServiceError | SandboxRuntimeError,
    *,
    sandbox_id: str = "",
    path: str = "",
) -> NoReturn:
    """Ends the call (a `grpc.aio.ServicerContext`) with `exc`'s status, message and detail."""
    detail = detail_of(exc, sandbox_id=sandbox_id, path=path)
    await context.abort(
        grpc_status(exc.code),
        bounded(str(exc)),
        trailing_metadata=error_detail.to_metadata(detail),
    )
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def error_frame(code: str, message: str, detail: epb.ErrorDetail | None = None) -> pb.ExecResponse:
    """Exec's terminal error frame (code as a google.rpc.Code number)."""
    EXEC_ERRORS.labels(code).inc()
    error = pb.ExecError(code=int(grpc_status(code).value[0]), message=bounded(message))
    if detail is not None:
        error.detail.CopyFrom(detail)
    return pb.ExecResponse(error=error)

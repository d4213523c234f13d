"""The service's typed errors: each carries the gRPC status code it is reported with.

Only `api` turns these into gRPC statuses; the other modules raise them and never import grpc.
`aviato.runtime.base.SandboxRuntimeError` has the same `code` attribute and is translated the same
way. Anything else that escapes to `api` is a bug, reported as INTERNAL with a logged traceback.
"""

from __future__ import annotations

__all__ = [
    "MAX_MESSAGE_CHARS",
    "AlreadyExists",
    "CapacityExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "bounded",
]


# A status message travels in the `grpc-message` trailer, percent-encoded (up to 12 bytes per
# character), and clients refuse trailers beyond 16 KiB: a message that quotes a huge request
# value would turn the intended status into RESOURCE_EXHAUSTED on the client.
MAX_MESSAGE_CHARS = 512


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message`, cut to `limit` characters (saying how much was cut)."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message) - limit} more characters)"


class ServiceError(Exception):
    """Base of the service's errors. `code` is a grpc.StatusCode name.

    The message is bounded (see `bounded`): it may quote request values of any size.
    """

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """A request field is invalid. The message starts with the field's path ("spec.env: ...")."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ServiceError):
    """Unknown id, or an id that belongs to another owner (the two are indistinguishable)."""

    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class CapacityExceeded(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"

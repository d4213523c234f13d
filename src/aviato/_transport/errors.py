"""The one mapping from a service's error (status code + `ErrorDetail`) to `aviato.exceptions`.

Every transport ends here: the gRPC transport for a failed call's status and for Exec's error
frames, the in-memory transport for the statuses its fake service reports. Nothing reads the
message text: the status code decides, refined by the detail's `reason` when the service sent
one (errors.proto). A service older than the details sends none; then the code alone decides,
with what the caller knows (a file operation's NOT_FOUND is about the file).

Messages stay in the user's words: ``"<operation> failed: <the service's message>"``, the
field the service refused named as the user wrote it (`field_words`); a status without a
message gets a plain phrase, never a status name. The exception's ``code`` attribute
carries the status name for programs.
"""

from __future__ import annotations

from aviato._transport.field_words import in_user_words
from aviato.exceptions import (
    AviatoAuthenticationError,
    AviatoConnectionError,
    AviatoError,
    SandboxError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxResourceExhaustedError,
    SandboxTerminatedError,
    SandboxTimeoutError,
    SandboxValidationError,
)
from aviato.v1 import errors_pb2 as epb

__all__ = ["CODE_NAMES", "code_name", "from_status", "is_transient"]

#: google.rpc.Code numbers (as in Exec's error frame) to their names.
CODE_NAMES: dict[int, str] = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}

# What to say when the service gave no message.
_PLAIN = {
    "CANCELLED": "the call was cancelled",
    "INVALID_ARGUMENT": "the request was refused as invalid",
    "DEADLINE_EXCEEDED": "no answer in time",
    "NOT_FOUND": "not found",
    "PERMISSION_DENIED": "permission denied",
    "RESOURCE_EXHAUSTED": "the service is at capacity",
    "FAILED_PRECONDITION": "the sandbox is not in a state that allows this",
    "ABORTED": "cut off because the sandbox ended",
    "UNIMPLEMENTED": "the service does not support this",
    "UNAVAILABLE": "the service is not reachable",
    "UNAUTHENTICATED": "the service refused the credentials",
}

# The codes with which a file operation reports a problem with the file itself.
_FILE_CODES = frozenset(
    {
        "NOT_FOUND",
        "INVALID_ARGUMENT",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "OUT_OF_RANGE",
        "UNKNOWN",
        "INTERNAL",
    }
)
_FILE_REASONS = frozenset({epb.FILE_NOT_FOUND, epb.PATH_INVALID, epb.FILE_PERMISSION_DENIED})
_FILE_REASON_OF_CODE = {
    "NOT_FOUND": "FILE_NOT_FOUND",
    "PERMISSION_DENIED": "FILE_PERMISSION_DENIED",
    "INVALID_ARGUMENT": "PATH_INVALID",
}
# In a file operation, every problem is reported as the file's (as before the details existed),
# except a sandbox that does not exist.


def code_name(code: str | int) -> str:
    """A status name ("NOT_FOUND") from a name or a google.rpc.Code number."""
    if isinstance(code, int):
        return CODE_NAMES.get(code, "UNKNOWN")
    return code if code in _PLAIN or code in CODE_NAMES.values() else "UNKNOWN"


def from_status(
    code: str | int,
    message: str,
    detail: epb.ErrorDetail | None = None,
    *,
    op: str,
    sandbox_id: str | None = None,
    filepath: str | None = None,
) -> AviatoError:
    """The exception that describes a failed call.

    `code`: the status name or number; `message`: the service's text (shown, never parsed);
    `detail`: its ErrorDetail, if it sent one; `op`: the operation in the user's words ("read
    file"); `sandbox_id`/`filepath`: what the caller was working on."""
    name = code_name(code)
    reason = detail.reason if detail is not None else epb.ERROR_REASON_UNSPECIFIED
    if detail is not None and detail.sandbox_id and sandbox_id is None:
        sandbox_id = detail.sandbox_id
    text = message or _PLAIN.get(name, "the service reported an error")
    if detail is not None and detail.field:
        text = in_user_words(detail.field, text)
    what = f"{op} failed: {text}"

    about_file = reason in _FILE_REASONS or (
        filepath is not None and name in _FILE_CODES and reason != epb.SANDBOX_NOT_FOUND
    )
    if about_file:
        path = (detail.path if detail is not None else "") or filepath
        return SandboxFileError(
            f"{op} {path!r} failed: {text}" if path else what,
            filepath=path,
            sandbox_id=sandbox_id,
            code=name,
            reason=_file_reason(reason, name),
        )
    if reason == epb.SANDBOX_TERMINATED or name == "ABORTED":
        # "cut off: the sandbox ended under it": never retried, since a command that started
        # once must not run again.
        return SandboxTerminatedError(what, sandbox_id=sandbox_id, code=name)
    if reason == epb.EXEC_NOT_FOUND:  # the sandbox is there; the command is not
        return SandboxNotFoundError(what, sandbox_id=sandbox_id, code=name)
    if reason == epb.SANDBOX_NOT_FOUND or name == "NOT_FOUND":
        if sandbox_id:
            what = f"{op} failed: sandbox {sandbox_id!r} not found"
        return SandboxNotFoundError(what, sandbox_id=sandbox_id, code=name)
    if reason == epb.CREDENTIALS_INVALID or name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return AviatoAuthenticationError(
            f"{what} (set AVIATO_API_KEY to a valid key for this service)", code=name
        )
    if name == "DEADLINE_EXCEEDED":
        return SandboxTimeoutError(what, sandbox_id=sandbox_id, code=name)
    if name == "UNAVAILABLE":
        # With a detail the service itself answered (something it reached was unavailable,
        # such as an image's registry); without one, the service could not be reached.
        lead = "" if detail is not None else "service unavailable: "
        return AviatoConnectionError(f"{op} failed: {lead}{text}", code=name)
    if reason == epb.FIELD_INVALID or name == "INVALID_ARGUMENT":
        return SandboxValidationError(what, sandbox_id=sandbox_id, code=name)
    if reason in (epb.CAPACITY_EXHAUSTED, epb.QUOTA_EXCEEDED) or name == "RESOURCE_EXHAUSTED":
        return SandboxResourceExhaustedError(what, sandbox_id=sandbox_id, code=name)
    if reason == epb.SANDBOX_NOT_RUNNING or name in ("FAILED_PRECONDITION", "CANCELLED"):
        return SandboxNotRunningError(what, sandbox_id=sandbox_id, code=name)
    return SandboxError(what, sandbox_id=sandbox_id, code=name)


def _file_reason(reason: int, code: str) -> str:
    """`SandboxFileError.reason`: the detail's file reason, else one read off the code."""
    if reason in _FILE_REASONS:
        return epb.ErrorReason.Name(reason)
    return _FILE_REASON_OF_CODE.get(code, "FILE_IO_FAILED")


def is_transient(err: BaseException) -> bool:
    """True for the failure a retry may cure: the service could not be reached."""
    return isinstance(err, AviatoConnectionError) and err.code == "UNAVAILABLE"

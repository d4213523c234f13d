"""The exceptions of the aviato SDK: one hierarchy, rooted at `AviatoError`.

```
AviatoError                            .code (gRPC status name, when one applies)
├── AviatoAuthenticationError          API key missing or rejected (UNAUTHENTICATED, ...)
│   └── WandbAuthError                 kept for imports of aviato-era code; never raised
├── AviatoConnectionError              service unreachable, or the local one failed to start
├── SandboxError                       .sandbox_id
│   ├── SandboxNotRunningError         the sandbox was stopped, never started, or is gone
│   ├── SandboxTimeoutError            a wait or a command ran out of time (.exec_result)
│   ├── SandboxTerminatedError         stopped (by you, its lease or its lifetime); a command
│   │                                  cut off because its sandbox ended (never retried)
│   ├── SandboxFailedError             could not start, or its main process failed
│   ├── SandboxNotFoundError           no sandbox with that id (or not yours)
│   ├── SandboxValidationError         the service refused a request (also a ValueError)
│   ├── SandboxResourceExhaustedError  the service is at capacity
│   ├── SandboxExecutionError          .exec_result, .exception_type, .exception_message
│   │   └── RemoteFunctionError        a @session.function raised (also a FunctionError)
│   ├── SandboxFileError               .filepath
│   └── CodeContextError               a code context's interpreter is gone (closed, killed,
│                                      crashed, or its sandbox ended); its state is lost
└── FunctionError
    ├── AsyncFunctionError             @session.function applied to an `async def`
    └── FunctionSerializationError     a value is not JSON-safe (also a TypeError)
```

Raw gRPC errors never reach user code: every failure of a call is translated into one of these
by the transport, from the status code and the service's structured error detail, in one place
(`aviato._transport.errors`). `OperationRef.result(timeout=...)` running out of time raises the
standard `TimeoutError` (`concurrent.futures.TimeoutError`), not `SandboxTimeoutError`: the
operation itself goes on and can be awaited again.

`ProcessResult` (with its `ResourceUsage`), the outcome of a command, lives here too, as
`subprocess` keeps `CompletedProcess` beside `CalledProcessError`: the errors of a command carry
one (`exec_result`) and `ProcessResult.check_returncode` raises one. It is exported as
`aviato.ProcessResult`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

__all__ = [
    "AsyncFunctionError",
    "AviatoAuthenticationError",
    "AviatoConnectionError",
    "AviatoError",
    "CodeContextError",
    "FunctionError",
    "FunctionSerializationError",
    "RemoteFunctionError",
    "SandboxError",
    "SandboxExecutionError",
    "SandboxFailedError",
    "SandboxFileError",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxResourceExhaustedError",
    "SandboxTerminatedError",
    "SandboxTimeoutError",
    "SandboxValidationError",
    "WandbAuthError",
]


class AviatoError(Exception):
    """Base class of every error raised by the SDK.

    `code` is the name of the gRPC status code the service answered with (e.g. ``"NOT_FOUND"``),
    or None when the error was detected by the client.
    """

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class AviatoAuthenticationError(AviatoError):
    """The service refused the credentials (`AVIATO_API_KEY`), or none were given over TCP."""


class WandbAuthError(AviatoAuthenticationError):
    """Kept so that aviato-era code importing it still works. This SDK never raises it."""


class AviatoConnectionError(AviatoError):
    """The service could not be reached (after retries), or the local service failed to start."""


class SandboxError(AviatoError):
    """An operation on a sandbox failed. `sandbox_id` names the sandbox when known."""

    def __init__(
        self, message: str = "", *, sandbox_id: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.sandbox_id = sandbox_id


class SandboxNotRunningError(SandboxError):
    """The sandbox is not running: it was stopped (or stopped before it started), or it ended."""


class SandboxTimeoutError(SandboxError):
    """A wait ran out of time, or a command hit its `timeout_seconds`.

    For a command, `exec_result` holds the output collected until it was killed.
    """

    def __init__(
        self,
        message: str = "",
        *,
        sandbox_id: str | None = None,
        code: str | None = None,
        exec_result: ProcessResult | None = None,
    ) -> None:
        super().__init__(message, sandbox_id=sandbox_id, code=code)
        self.exec_result = exec_result


class SandboxTerminatedError(SandboxError):
    """The sandbox was terminated: stopped by a client, its lease expired or its lifetime ended.

    `status_reason` carries the service's reason (e.g. ``"lease expired"``).

    Also raised by a command (`Process.result()`) that was cut off because its sandbox ended
    while it ran: stopped by any client, its main process ended, or its supervisor died (code
    ``"ABORTED"``). Such a command may have partly run; the SDK does not run it again, and
    neither should a retry loop of yours without knowing that the command is idempotent.
    """

    def __init__(
        self,
        message: str = "",
        *,
        sandbox_id: str | None = None,
        code: str | None = None,
        status_reason: str | None = None,
    ) -> None:
        super().__init__(message, sandbox_id=sandbox_id, code=code)
        self.status_reason = status_reason


class SandboxFailedError(SandboxError):
    """The sandbox failed: it could not start, or its main process failed (e.g. OOM-killed).

    `status_reason` carries the service's reason, `returncode` the main process's exit code.
    """

    def __init__(
        self,
        message: str = "",
        *,
        sandbox_id: str | None = None,
        code: str | None = None,
        status_reason: str | None = None,
        returncode: int | None = None,
    ) -> None:
        super().__init__(message, sandbox_id=sandbox_id, code=code)
        self.status_reason = status_reason
        self.returncode = returncode


class SandboxNotFoundError(SandboxError):
    """No sandbox with this id exists (sandboxes of other owners are reported the same way);
    from `Sandbox.attach`, no command with this id (the message says which)."""


class SandboxValidationError(SandboxError, ValueError):
    """The service rejected a request as invalid (INVALID_ARGUMENT); the message names the field."""


class SandboxResourceExhaustedError(SandboxError):
    """The service is at capacity (RESOURCE_EXHAUSTED): too many sandboxes or a quota is full."""


class SandboxExecutionError(SandboxError):
    """A command failed.

    Raised by `Process.result()` when `check=True` and the command exited non-zero (then
    `exec_result` is the full `ProcessResult`), when the service reported an error for the
    command, when the output stream broke before the exit status arrived, and for misuse of
    `stdin` (writing after close or after the command exited).

    `exception_type` and `exception_message` are set for remote-function errors.
    """

    def __init__(
        self,
        message: str = "",
        *,
        sandbox_id: str | None = None,
        code: str | None = None,
        exec_result: ProcessResult | None = None,
        exception_type: str | None = None,
        exception_message: str | None = None,
    ) -> None:
        super().__init__(message, sandbox_id=sandbox_id, code=code)
        self.exec_result = exec_result
        self.exception_type = exception_type
        self.exception_message = exception_message


class SandboxFileError(SandboxError):
    """Reading or writing a file in the sandbox failed; `filepath` is the path concerned.

    `reason` says why, for programs (as the original SDK's): ``"FILE_NOT_FOUND"``,
    ``"FILE_PERMISSION_DENIED"``, ``"PATH_INVALID"`` (a directory where a file was expected,
    a path that cannot be), ``"FILE_IO_FAILED"`` (anything else the service reported), or
    None when the SDK itself refused (a file larger than `max_bytes`, say).
    """

    def __init__(
        self,
        message: str = "",
        *,
        filepath: str | None = None,
        sandbox_id: str | None = None,
        code: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, sandbox_id=sandbox_id, code=code)
        self.filepath = filepath
        self.reason = reason


class CodeContextError(SandboxError):
    """A `CodeContext` cannot run code: it was closed, its interpreter could not start or is
    gone (killed after a run ignored its interrupt, crashed, or its sandbox ended). Its state is
    lost; make a new context. An error of the code itself is never raised: it is the run's
    ``Execution.error``."""


class FunctionError(AviatoError):
    """Base class of the errors of `@session.function()`."""


class AsyncFunctionError(FunctionError):
    """`@session.function()` was applied to an `async def` function (not supported)."""


class FunctionSerializationError(FunctionError, TypeError):
    """An argument, a captured variable or the result of a remote function is not JSON-safe."""


class RemoteFunctionError(SandboxExecutionError, FunctionError):
    """A remote function raised an exception inside its sandbox.

    `exception_type` is the remote exception's qualified type name (e.g. ``"ValueError"``),
    `exception_message` its message, `remote_traceback` the formatted remote traceback, and
    `exec_result` the runner process's result (its stdout/stderr hold what the function printed).
    """

    def __init__(
        self,
        message: str = "",
        *,
        sandbox_id: str | None = None,
        exec_result: ProcessResult | None = None,
        exception_type: str | None = None,
        exception_message: str | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        super().__init__(
            message,
            sandbox_id=sandbox_id,
            exec_result=exec_result,
            exception_type=exception_type,
            exception_message=exception_message,
        )
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        base = super().__str__()
        if self.remote_traceback:
            return f"{base}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return base


# --- the outcome of a command ------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceUsage:
    """What a command used: CPU seconds (user, system), peak memory and wall-clock time."""

    cpu_user_seconds: float = 0.0
    cpu_system_seconds: float = 0.0
    peak_memory_bytes: int = 0
    wall_seconds: float = 0.0


@dataclass(frozen=True)
class ProcessResult:
    """The outcome of a command run by `Sandbox.exec`.

    `stdout`/`stderr` are the output decoded as UTF-8 (invalid bytes replaced); `stdout_bytes`/
    `stderr_bytes` are exact. `returncode` is the real exit code (128+N when killed by signal N;
    `signal` is then N). `timed_out` is True when `exec(timeout_seconds=...)` killed it.
    `oom_killed` is True when the out-of-memory killer killed it at the sandbox's memory limit
    (the service's best attribution: the sandbox's OOM-kill count rose while the command ran and
    it died of SIGKILL without a timeout or a kill by the service; another process OOM-killed
    at the same time can make it True for a command killed by something else). `usage` is the
    command's resource usage as measured by the service.

    `stdout_truncated`/`stderr_truncated` are True when that stream was longer than
    ``max_output_bytes`` (64 MiB unless configured): the result then holds the stream's first
    ``max_output_bytes`` bytes only. The rest went to a reader of the live stream, or was dropped;
    the command itself ran to its end either way.
    """

    stdout: str
    stderr: str
    returncode: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    command: list[str] = field(default_factory=list)
    signal: int = 0
    timed_out: bool = False
    usage: ResourceUsage | None = None
    oom_killed: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.returncode == 0

    def check_returncode(self) -> ProcessResult:
        """Raises `SandboxExecutionError` (carrying this result) if the exit code is not 0."""
        if self.returncode != 0:
            raise SandboxExecutionError(
                f"command {shlex.join(self.command)!r} exited with code {self.returncode}"
                + (f"; stderr: {self.stderr.strip()[-500:]}" if self.stderr.strip() else ""),
                exec_result=self,
            )
        return self

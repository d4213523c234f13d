"""What a finished command produced: `ProcessResult` and `ResourceUsage` (plain values)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from aviato.exceptions import SandboxExecutionError

__all__ = ["ProcessResult", "ResourceUsage"]


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

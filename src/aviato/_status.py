"""`SandboxStatus`: the lifecycle states of a sandbox."""

from __future__ import annotations

import enum

from aviato.v1 import sandbox_pb2 as pb

__all__ = ["SandboxStatus"]


class SandboxStatus(enum.StrEnum):
    """The status of a sandbox. Values are lowercase strings, so `sb.status == "running"` works.

    ```
    PENDING → CREATING → RUNNING → COMPLETED   (the main process exited 0)
                  │        ⇅ ├───→ FAILED      (it exited non-zero, was OOM-killed, ...)
                  │      PAUSED ─→ TERMINATED  (stopped by a client, a lease, the lifetime,
                  └──────────┴───→ TERMINATED   or idle_timeout)
    ```

    PAUSED: frozen by `Sandbox.pause` until `Sandbox.resume`. `UNSPECIFIED` exists for
    compatibility; this service never reports it.
    """

    PENDING = "pending"
    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    TERMINATED = "terminated"
    UNSPECIFIED = "unspecified"

    @property
    def is_terminal(self) -> bool:
        """True for COMPLETED, FAILED and TERMINATED: the sandbox will not run again."""
        return self in _TERMINAL

    @property
    def is_running(self) -> bool:
        """True for RUNNING (and PAUSED)."""
        return self in (SandboxStatus.RUNNING, SandboxStatus.PAUSED)

    @property
    def is_starting(self) -> bool:
        """True for PENDING and CREATING."""
        return self in (SandboxStatus.PENDING, SandboxStatus.CREATING)

    @classmethod
    def from_proto(cls, value: int) -> SandboxStatus:
        """Converts an `aviato.v1.SandboxStatus` number; unknown numbers become UNSPECIFIED."""
        return _FROM_PROTO.get(value, cls.UNSPECIFIED)

    def to_proto(self) -> int:
        """The `aviato.v1.SandboxStatus` number of this status."""
        return _TO_PROTO.get(self, pb.SANDBOX_STATUS_UNSPECIFIED)

    @classmethod
    def parse(cls, value: str | SandboxStatus) -> SandboxStatus:
        """`SandboxStatus("running")`, case-insensitive; raises ValueError naming the choices."""
        if isinstance(value, SandboxStatus):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(s.value for s in cls)
            raise ValueError(
                f"unknown sandbox status {value!r}; expected one of: {choices}"
            ) from None


_TERMINAL = frozenset({SandboxStatus.COMPLETED, SandboxStatus.FAILED, SandboxStatus.TERMINATED})

_TO_PROTO: dict[SandboxStatus, int] = {
    SandboxStatus.PENDING: pb.SANDBOX_STATUS_PENDING,
    SandboxStatus.CREATING: pb.SANDBOX_STATUS_CREATING,
    SandboxStatus.RUNNING: pb.SANDBOX_STATUS_RUNNING,
    SandboxStatus.COMPLETED: pb.SANDBOX_STATUS_COMPLETED,
    SandboxStatus.FAILED: pb.SANDBOX_STATUS_FAILED,
    SandboxStatus.TERMINATED: pb.SANDBOX_STATUS_TERMINATED,
    SandboxStatus.PAUSED: pb.SANDBOX_STATUS_PAUSED,
    SandboxStatus.UNSPECIFIED: pb.SANDBOX_STATUS_UNSPECIFIED,
}
_FROM_PROTO: dict[int, SandboxStatus] = {v: k for k, v in _TO_PROTO.items()}

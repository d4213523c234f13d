"""Pausing, resuming and extending a sandbox.

`SandboxPausing` is a base class of `aviato.Sandbox`, not used alone: `SandboxCore` provides
the state below (the last answer of the service, `_record`). What a paused sandbox does and
refuses: docs/state.md (pause and resume).
"""

from __future__ import annotations

import math

from aviato._client import Client
from aviato._operation import OperationRef
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["SandboxPausing"]


class SandboxPausing:
    """`pause`, `resume`, `extend` (see the module docstring); `Sandbox` provides the state."""

    _request_timeout: float

    async def _ensure_started(self) -> None:
        raise NotImplementedError

    async def _client(self) -> Client:
        raise NotImplementedError

    def _require_id(self) -> str:
        raise NotImplementedError

    def _apply(self, record: pb.Sandbox) -> None:
        raise NotImplementedError

    def pause(self) -> OperationRef[None]:
        """Freezes every process of the running sandbox where it is: it uses no CPU (its
        memory stays its own) until `resume`, which continues it from there. While it is
        paused, `exec`, file transfers and port connections are refused with
        `SandboxNotRunningError` ("is paused: resume it first"), and its lifetime keeps
        running (`extend` it). Resolves once every process is frozen (status PAUSED).
        Idempotent. Raises `SandboxNotRunningError` for an ended sandbox, or when the service's
        node cannot freeze (no cgroups)."""
        return OperationRef._of(self._change(resume=False))

    def resume(self) -> OperationRef[None]:
        """Lets a paused sandbox continue from where it was (status RUNNING). Idempotent."""
        return OperationRef._of(self._change(resume=True))

    def extend(self, seconds: float) -> OperationRef[None]:
        """Moves the end of the sandbox's lifetime (`expires_at`) `seconds` later. Raises
        `SandboxValidationError` when its whole lifetime would pass the service's maximum (7
        days), saying how much can still be added. A sandbox without a lifetime is unchanged."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(f"seconds must be a number, not {type(seconds).__name__}")
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"seconds must be a positive number, not {seconds!r}")
        return OperationRef._of(self._extend(float(seconds)))

    async def _change(self, resume: bool) -> None:
        await self._ensure_started()
        sandbox_id = self._require_id()
        client = await self._client()
        transport, timeout = client.transport, self._request_timeout
        if resume:
            again = pb.ResumeSandboxRequest(sandbox_id=sandbox_id)
            record = await client.with_retry(
                lambda: transport.resume_sandbox(again, call_timeout=timeout), op="resume sandbox"
            )
        else:
            hold = pb.PauseSandboxRequest(sandbox_id=sandbox_id)
            record = await client.with_retry(
                lambda: transport.pause_sandbox(hold, call_timeout=timeout), op="pause sandbox"
            )
        self._apply(record)

    async def _extend(self, seconds: float) -> None:
        await self._ensure_started()
        sandbox_id = self._require_id()
        client = await self._client()
        request = pb.ExtendSandboxRequest(sandbox_id=sandbox_id, seconds=seconds)
        record = await client.with_retry(  # never repeated: a lost answer would extend twice
            lambda: client.transport.extend_sandbox(request, call_timeout=self._request_timeout),
            op="extend sandbox",
            retry=False,
        )
        self._apply(record)

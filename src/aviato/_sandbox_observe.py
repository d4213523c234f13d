"""Status that tells the truth: every answer of the service corrects what a `Sandbox` knows.

`SandboxObserving` is a base class of `aviato.Sandbox` (through `SandboxIO` and
`SandboxCommands`), not used alone: `SandboxCore` provides the state below. A command that ran
or a file that moved shows the sandbox running, so a status still saying PENDING, CREATING or
PAUSED is corrected at once; a call refused because the sandbox is not running (or gone) asks
the service for the record again before the error reaches the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from aviato._client import Client
from aviato._status import SandboxStatus
from aviato.exceptions import (
    SandboxExecutionError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["SandboxObserving"]

T = TypeVar("T")


class SandboxObserving:
    """`_observed` (see the module docstring); `Sandbox` provides the state."""

    _sandbox_id: str | None
    _record: pb.Sandbox | None
    _status: SandboxStatus | None

    async def _client(self) -> Client:
        raise NotImplementedError

    def _apply(self, record: pb.Sandbox) -> None:
        raise NotImplementedError

    def _saw_running(self) -> None:
        """An answer showed the sandbox running (a command ran in it, a file moved): a status
        still PENDING, CREATING or PAUSED is stale. The status is what the service last said,
        corrected by every answer, not only by `get_status`."""
        status, record = self._status, self._record
        if status is None or status.is_terminal or status == SandboxStatus.RUNNING:
            return
        if record is None:
            return
        seen = pb.Sandbox()
        seen.CopyFrom(record)
        seen.status = pb.SANDBOX_STATUS_RUNNING
        seen.status_reason = ""
        self._apply(seen)

    async def _observed(self, work: Awaitable[T]) -> T:
        """Awaits `work` (a call that reaches into the sandbox) and lets its answer correct the
        status: one that went through shows the sandbox running; one refused because the
        sandbox is not running (or gone) makes the status be asked again."""
        try:
            value = await work
        except (SandboxExecutionError, SandboxTimeoutError, SandboxFileError) as err:
            ran = getattr(err, "exec_result", None) is not None
            if ran or isinstance(err, SandboxFileError):
                self._saw_running()
            raise
        except (SandboxNotRunningError, SandboxTerminatedError, SandboxNotFoundError):
            await self._refresh_quietly()
            raise
        self._saw_running()
        return value

    async def _refresh_quietly(self) -> None:
        """Asks the service for the record once (a few seconds at most); keeps what it knew
        when that fails."""
        sandbox_id, status = self._sandbox_id, self._status
        if sandbox_id is None or (status is not None and status.is_terminal):
            return
        with contextlib.suppress(Exception):
            client = await self._client()
            self._apply(await client.transport.get_sandbox(sandbox_id, call_timeout=5.0))

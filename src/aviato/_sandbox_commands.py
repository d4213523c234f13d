"""A sandbox's commands by id: `Sandbox.attach` and `Sandbox.processes` (docs/interactive.md).

`SandboxCommands` is a base class of `aviato.Sandbox`, not used alone. Every command the
service runs has an id (`Process.exec_id`); a command started by this SDK runs on when its
connection goes away (a killed client, a lost network), and its output is retained for a while
(the service documents how much), so this or another process can attach to it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from aviato import _defaults
from aviato._bridge import get_bridge
from aviato._client import Client
from aviato._operation import OperationRef
from aviato._options import SandboxDefaults
from aviato._process import ExecState, Process, resuming
from aviato._sandbox_observe import SandboxObserving
from aviato.exceptions import SandboxError
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["ProcessInfo", "SandboxCommands"]


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One command of a sandbox, as `Sandbox.processes()` lists it.

    ``state`` is ``"running"``, ``"exited"`` (``returncode`` is its exit code) or ``"failed"``
    (``error`` says why: it could not start, or its sandbox ended under it). ``output_bytes``
    counts its output so far (stdout and stderr together); the service still holds it from
    offset ``retained_from`` on (`Sandbox.attach` from an earlier offset starts there).
    ``attached``: connections reading it now."""

    exec_id: str
    command: list[str]
    state: Literal["running", "exited", "failed"]
    started_at: datetime | None
    ended_at: datetime | None
    returncode: int | None
    error: str | None
    tty: bool
    output_bytes: int
    retained_from: int
    attached: int

    @classmethod
    def _of(cls, info: pb.ExecInfo) -> ProcessInfo:
        state: Literal["running", "exited", "failed"] = "running"
        if info.state in ("exited", "failed"):
            state = "exited" if info.state == "exited" else "failed"
        return cls(
            exec_id=info.exec_id,
            command=list(info.argv),
            state=state,
            started_at=_time(info, "started_at"),
            ended_at=_time(info, "ended_at"),
            returncode=info.exit.exit_code if info.HasField("exit") else None,
            error=info.error or None,
            tty=info.tty,
            output_bytes=info.output_bytes,
            retained_from=info.retained_from,
            attached=info.attached,
        )


def _time(info: pb.ExecInfo, name: str) -> datetime | None:
    if not info.HasField(name):
        return None
    stamp = getattr(info, name)
    return stamp.ToDatetime().replace(tzinfo=UTC)  # type: ignore[no-any-return]


class SandboxCommands(SandboxObserving):
    """`attach` and `processes` (see the module docstring); `Sandbox` provides the state."""

    _defaults: SandboxDefaults
    _request_timeout: float

    async def _ensure_started(self) -> None:
        raise NotImplementedError

    async def _client(self) -> Client:
        raise NotImplementedError

    def _require_id(self) -> str:
        raise NotImplementedError

    def attach(
        self,
        exec_id: str,
        *,
        offset: int = 0,
        check: bool = False,
        max_output_bytes: int | None = None,
    ) -> Process:
        """Follows a command started earlier (by this or another process) by its id
        (`Process.exec_id`, or `processes()`); returns a `Process` at once, as `exec` does.

        Its output arrives from `offset` (bytes of stdout and stderr together since the command
        started; 0: from the start), or from the oldest byte the service still retains when
        that is later: ``process.dropped_bytes`` then says how many were lost. Then the live
        rest, then the exact exit status in ``result()``, also for a command that has already
        ended (the service keeps ended commands for a while; see docs/interactive.md).
        ``process.stdin``, ``resize`` and ``send_signal`` reach the command as they would from
        the call that started it; ``cancel()`` kills it; ``detach()`` leaves it running.
        Raises (when waited for) `SandboxNotFoundError` for an id this owner does not have in
        this sandbox, or no longer kept.
        """
        if not isinstance(exec_id, str) or not exec_id:
            raise ValueError(f"exec_id must be a command's id (Process.exec_id), not {exec_id!r}")
        start = _defaults.byte_count("offset", offset)
        keep = (
            self._defaults.max_output_bytes
            if max_output_bytes is None
            else _defaults.byte_count("max_output_bytes", max_output_bytes)
        )
        state = ExecState([], stdin=True, max_output_bytes=keep)
        request = pb.ExecAttach(exec_id=exec_id, offset=start)
        future = get_bridge().submit(self._attach(state, request, check))
        return Process(future, state)

    async def _attach(self, state: ExecState, request: pb.ExecAttach, check: bool) -> Any:
        try:
            await self._ensure_started()
            request.sandbox_id = self._require_id()
            client = await self._client()
            init = pb.ExecInit(sandbox_id=request.sandbox_id)
            retry = resuming(client, "attach")
            return await self._observed(
                state.drive(client.transport, init, check=check, attach=request, retry=retry)
            )
        except BaseException as err:
            state.finish(
                err if isinstance(err, Exception) else SandboxError("the attach was cancelled")
            )
            raise

    def processes(self) -> OperationRef[list[ProcessInfo]]:
        """The sandbox's running commands and those that ended recently, oldest first, as
        `ProcessInfo` (id, command, state, start and end, exit code). Only this owner's."""
        return OperationRef._of(self._processes())

    async def _processes(self) -> list[ProcessInfo]:
        await self._ensure_started()
        client = await self._client()
        infos = await client.transport.list_execs(
            self._require_id(), call_timeout=self._request_timeout
        )
        return [ProcessInfo._of(info) for info in infos]

"""`Sandbox`: one isolated environment, its lifecycle, commands and files.

Every method returns at once (except the few documented as blocking: `run`, `wait`,
`get_status` and the sync context manager): the work runs on the SDK's background loop and the
method returns an `OperationRef` or a `Process`. All mutable state of a Sandbox object is changed
only on that loop, so one object may be used from many threads.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import logging
import math
import os
import shlex
import time
from collections.abc import Generator, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, Unpack

from aviato import _defaults, _files
from aviato._bridge import await_concurrent as _await_concurrent
from aviato._bridge import get_bridge
from aviato._client import Client, get_client
from aviato._defaults import DEFAULT_GRACEFUL_SHUTDOWN_SECONDS, SandboxDefaults
from aviato._files import FileStream
from aviato._operation import OperationRef
from aviato._options import RunOptions, SandboxArgs, resolve
from aviato._process import ExecState, Process
from aviato._status import SandboxStatus
from aviato.exceptions import (
    SandboxError,
    SandboxFailedError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato._session import Session


class SandboxOwner(Protocol):
    """What a sandbox needs from the `Session` that owns it: its lease, a check that it is
    still open, and being told when the sandbox was created and when it ended."""

    _lease_id: str
    _lease_ttl: float

    def _check_open(self) -> None: ...

    def _on_sandbox_created(self, sandbox: Sandbox) -> None: ...

    def _forget(self, sandbox: Sandbox) -> None: ...


__all__ = ["Sandbox"]

logger = logging.getLogger("aviato")

_STARTED = pb.WaitSandboxRequest.CONDITION_STARTED
_TERMINAL = pb.WaitSandboxRequest.CONDITION_TERMINAL
_WAIT_SLICE_SECONDS = 60.0  # the service's cap per WaitSandbox call


def _ts(record: pb.Sandbox, name: str) -> datetime | None:
    if not record.HasField(name):
        return None
    stamp = getattr(record, name)
    return stamp.ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]


class Sandbox:
    """A sandbox: an isolated environment that runs a main process and your commands.

    Make one with `Sandbox.run(...)` (create and start; returns once the service accepted the
    create, not when it is RUNNING), with the constructor (nothing is sent until first use or
    `start()`), or from a `Session`. Find existing ones with `Sandbox.list()` / `Sandbox.from_id()`.

    Keyword arguments (constructor, `run`, `Session.sandbox`; the explicit value wins over
    `defaults`, see `SandboxDefaults`):
        command, args: The main process (`run(*command)` takes them positionally). Default: none,
            i.e. the service's keep-alive, which runs until the sandbox is stopped.
        container_image: Default `AVIATO_IMAGE`, else the service's default (``"host"``).
            An OCI reference (``"python:3.11"``, ``"ghcr.io/org/app:1.4"``) is pulled on first
            use; the sandbox is PENDING ("pulling image ...") meanwhile.
        image_command: True: the main process is the image's own ``Entrypoint + Cmd`` instead
            of the keep-alive; the sandbox ends when it exits, with its exit code (see
            `returncode`). Cannot be combined with a command (`SandboxValidationError`). A call's
            command or image_command overrides those of `defaults`.
        image_pull_credentials: `ImagePullCredentials` (or ``{"username", "password"}`` /
            ``{"token"}``) for the image's registry; used for this pull only, never stored by
            the service. Default: `defaults.image_pull_credentials`, else the service's Docker
            config, else anonymous.
        tags: Added to the default tags.
        environment_variables: Merged over the default environment.
        resources: ``{"cpu", "memory", "pids", "disk"}`` (strings or numbers).
        mounted_files: ``[{"path": "/abs", "content": b"..."}]`` (or the spelling
            ``mount_path``/``file_content``): read-only files inside the sandbox.
        network: `NetworkOptions` or dict; only isolated networking is available.
        max_lifetime_seconds: The service stops the sandbox after this long (default: the
            service's, 1 hour).
        working_dir: Absolute directory for the main process and commands (default ``/workspace``).
        node_selector: Node labels the sandbox's node must carry, ``{"pool": "gpu"}``, when the
            service places sandboxes on a cluster (docs/cluster.md); merged over the default
            selector. A selector no node matches leaves the sandbox PENDING until the service's
            placement deadline, then FAILED. Ignored by the local placement.
        base_url: The service (default `AVIATO_BASE_URL`, else `defaults.base_url`, else local).
        request_timeout_seconds: Deadline of each request; default of `wait()` (300 s).

    Cleanup: a sandbox made by a `Session` is stopped when the session closes, at interpreter exit,
    on SIGTERM, and — if the process is killed outright — by the service when the session's lease
    expires. A bare `Sandbox.run()` outside any session is *not* tied to this process: it runs
    until stopped or until its max lifetime (1 hour by default). Use ``with Sandbox.run() as sb:``
    or a Session to tie it to your code. A `stop()`, `delete()` or `write_file()` that is still
    running when the interpreter exits is not abandoned: the exit waits for it, up to 10 s (and
    the service completes a stop it has received even if that wait ends first).
    """

    def __init__(
        self,
        *,
        defaults: SandboxDefaults | None = None,
        _session: SandboxOwner | None = None,
        **options: Unpack[SandboxArgs],
    ) -> None:
        d = defaults or SandboxDefaults()
        self._defaults = d
        resolved = resolve(options, d)
        self._spec = resolved.spec
        self._pull_credentials = resolved.pull_credentials  # sent with the create, never kept
        self._base_url = resolved.base_url
        self._request_timeout = resolved.request_timeout_seconds
        self._request_id = resolved.request_id
        self._session = _session
        # lifecycle state (changed only on the loop thread)
        self._sandbox_id: str | None = None
        self._record: pb.Sandbox | None = None
        self._status: SandboxStatus | None = None
        self._status_updated_at: datetime | None = None
        self._start_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._stop_requested = False
        # The client of the service this sandbox lives on, and the loop it belongs to.
        self._bound: tuple[asyncio.AbstractEventLoop, Client] | None = None

    # -- construction helpers ------------------------------------------------------------------

    @classmethod
    def run(
        cls,
        *command: str,
        defaults: SandboxDefaults | None = None,
        **options: Unpack[RunOptions],
    ) -> Sandbox:
        """Creates and starts a sandbox; returns once the service accepted it (PENDING or later).

        ``Sandbox.run("python", "train.py")`` runs that as the main process; ``Sandbox.run()``
        runs the keep-alive; ``Sandbox.run(container_image="org/app:1", image_command=True)``
        runs the image's own Entrypoint + Cmd. Errors of the create (bad options, no service)
        are raised here; a failed image pull shows later, as a FAILED sandbox.
        This call blocks briefly (one request); everything after it is non-blocking.
        """
        sandbox = cls(
            command=command[0] if command else None,
            args=list(command[1:]) if command else None,
            defaults=defaults,
            **options,
        )
        sandbox.start().result()
        return sandbox

    @classmethod
    def session(cls, defaults: SandboxDefaults | Mapping[str, Any] | None = None) -> Session:
        """A new `Session` with these defaults (same as ``Session(defaults)``)."""
        from aviato._session import Session

        return Session(defaults)

    @classmethod
    def _from_record(
        cls, record: pb.Sandbox, base_url: str | None, timeout: float | None
    ) -> Sandbox:
        sandbox = cls(base_url=base_url, request_timeout_seconds=timeout)
        sandbox._spec = record.spec
        sandbox._apply(record)
        return sandbox

    # -- properties ----------------------------------------------------------------------------

    @property
    def sandbox_id(self) -> str | None:
        """The sandbox's id; None until it has been created."""
        return self._sandbox_id

    @property
    def status(self) -> SandboxStatus | None:
        """The last known status (no request is made); None if never started."""
        return self._status

    @property
    def status_reason(self) -> str | None:
        """Why the sandbox is in its status (e.g. ``"stopped"``, ``"lease expired"``)."""
        return (self._record.status_reason or None) if self._record is not None else None

    @property
    def status_updated_at(self) -> datetime | None:
        """When `status` was last confirmed by the service."""
        return self._status_updated_at

    @property
    def returncode(self) -> int | None:
        """Exit code of the main process once the sandbox is terminal, else None."""
        rec = self._record
        if rec is None or not rec.HasField("exit_code"):
            return None
        return rec.exit_code

    @property
    def created_at(self) -> datetime | None:
        """When the service accepted the create (UTC)."""
        return _ts(self._record, "created_at") if self._record is not None else None

    @property
    def started_at(self) -> datetime | None:
        """When the sandbox became RUNNING (UTC), if it has."""
        return _ts(self._record, "started_at") if self._record is not None else None

    @property
    def ended_at(self) -> datetime | None:
        """When the sandbox became terminal (UTC), if it has."""
        return _ts(self._record, "ended_at") if self._record is not None else None

    @property
    def expires_at(self) -> datetime | None:
        """The deadline set by the max lifetime."""
        return _ts(self._record, "expires_at") if self._record is not None else None

    @property
    def tags(self) -> builtins.list[str]:
        """The sandbox's tags (defaults first)."""
        return list(self._spec.tags)

    @property
    def container_image(self) -> str:
        """The image the sandbox runs (the service's default when none was named)."""
        if self._record is not None and self._record.spec.image:
            return self._record.spec.image
        return self._spec.image or _defaults.DEFAULT_IMAGE

    @property
    def node(self) -> str | None:
        """The node that runs the sandbox (``"local"`` for the embedded service)."""
        return (self._record.node or None) if self._record is not None else None

    @property
    def node_selector(self) -> dict[str, str]:
        """The node labels the sandbox asked for (empty: any node)."""
        return dict(self._spec.node_selector)

    def __repr__(self) -> str:
        status = self._status.value if self._status else "not started"
        return f"<Sandbox id={self._sandbox_id} status={status}>"

    # -- internals -----------------------------------------------------------------------------

    async def _client(self) -> Client:
        """The client of this sandbox's service, resolved on first use and then kept: the
        sandbox stays on the service it was created on even if AVIATO_STATE_DIR changes later.
        (Resolved again on another loop, as in a forked child, or once the client closed.)"""
        bound = self._bound
        loop = asyncio.get_running_loop()
        if bound is not None and bound[0] is loop and not bound[1].closed:
            return bound[1]
        client = await get_client(self._base_url)
        self._bound = (loop, client)
        return client

    def _apply(self, record: pb.Sandbox) -> None:
        """Takes a record from the service; the status is monotonic (never leaves terminal)."""
        new = SandboxStatus.from_proto(record.status)
        if self._sandbox_id is None:
            self._sandbox_id = record.id
        if self._status is not None and self._status.is_terminal and not new.is_terminal:
            return
        self._record = record
        self._status = new
        self._status_updated_at = datetime.now(UTC)

    def _timeout(self, timeout: float | None) -> float:
        """None → the request timeout (300 s by default); math.inf → no limit."""
        if timeout is None:
            return self._request_timeout
        if timeout < 0:
            raise ValueError("timeout must not be negative")
        return timeout

    def _require_id(self) -> str:
        if self._sandbox_id is None:  # pragma: no cover - guarded by _ensure_started
            raise SandboxNotRunningError("the sandbox has not been started")
        return self._sandbox_id

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> OperationRef[None]:
        """Sends the create (once; later calls share it). Resolves when the service accepted it.

        The create carries a request id, so a retried create never makes a second sandbox.
        """
        return OperationRef._of(self._ensure_started())

    async def _ensure_started(self) -> None:
        if self._sandbox_id is not None:
            return
        if self._stop_requested:
            raise SandboxNotRunningError("the sandbox was stopped before it started")
        if self._start_task is None:
            self._start_task = asyncio.ensure_future(self._create())
        task = self._start_task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                self._start_task = None
            raise
        except Exception:
            if self._start_task is task:
                self._start_task = None  # a later call may retry (same request id)
            raise

    async def _create(self) -> None:
        session = self._session
        if session is not None:
            session._check_open()
        client = await self._client()
        request = pb.CreateSandboxRequest(spec=self._spec, request_id=self._request_id)
        if self._pull_credentials is not None:  # only on the wire, never kept in self._spec
            request.spec.registry_auth.CopyFrom(self._pull_credentials._to_proto())
        if session is not None:
            request.lease_id = session._lease_id
            request.lease_ttl_seconds = session._lease_ttl
        # safe to repeat: the request id makes a retried create return the first sandbox
        record = await client.with_retry(
            lambda: client.transport.create_sandbox(request, call_timeout=self._request_timeout),
            op="create sandbox",
        )
        self._apply(record)
        if session is not None:
            session._on_sandbox_created(self)

    def wait(self, timeout: float | None = None) -> Sandbox:
        """Blocks until the sandbox is RUNNING (starting it if needed); returns it.

        `timeout`: None means `request_timeout_seconds` (300 s by default, as in the aviato SDK);
        ``float("inf")`` waits without limit. Raises `SandboxTimeoutError` when it passes,
        `SandboxFailedError` if the sandbox failed, `SandboxTerminatedError` if it was terminated
        and `SandboxNotRunningError` if you stopped it. Returns as well if the main process has
        already completed. In async code use ``await sandbox`` instead.
        """
        get_bridge().run(self._wait_started(timeout))
        return self

    async def _wait_started(self, wait_seconds: float | None) -> Sandbox:
        await self._wait_for(_STARTED, self._timeout(wait_seconds))
        status = self._status
        if self._stop_requested:
            raise SandboxNotRunningError("the sandbox was stopped", sandbox_id=self._sandbox_id)
        self._raise_for_terminal(status, raise_on_termination=True)
        return self

    def wait_until_complete(
        self, timeout: float | None = None, *, raise_on_termination: bool = True
    ) -> OperationRef[Sandbox]:
        """Resolves to the sandbox once it is terminal (its main process ended, or it was stopped).

        `timeout` as in `wait()` (None: 300 s; ``float("inf")``: no limit). A FAILED sandbox raises
        `SandboxFailedError`; a TERMINATED one raises `SandboxTerminatedError` unless
        `raise_on_termination` is False (a sandbox you stopped counts as terminated).
        """
        return OperationRef._of(self._wait_complete(timeout, raise_on_termination))

    async def _wait_complete(self, timeout_s: float | None, raise_on_termination: bool) -> Sandbox:
        await self._wait_for(_TERMINAL, self._timeout(timeout_s))
        status = self._status
        if self._stop_requested and raise_on_termination and status != SandboxStatus.FAILED:
            raise SandboxTerminatedError(
                f"sandbox {self._sandbox_id} was stopped",
                sandbox_id=self._sandbox_id,
                status_reason=self.status_reason,
            )
        self._raise_for_terminal(status, raise_on_termination=raise_on_termination)
        return self

    def _raise_for_terminal(
        self, status: SandboxStatus | None, *, raise_on_termination: bool
    ) -> None:
        if status == SandboxStatus.FAILED:
            raise SandboxFailedError(
                f"sandbox {self._sandbox_id} failed"
                + (f": {self.status_reason}" if self.status_reason else ""),
                sandbox_id=self._sandbox_id,
                status_reason=self.status_reason,
                returncode=self.returncode,
            )
        if status == SandboxStatus.TERMINATED and raise_on_termination:
            raise SandboxTerminatedError(
                f"sandbox {self._sandbox_id} was terminated"
                + (f": {self.status_reason}" if self.status_reason else ""),
                sandbox_id=self._sandbox_id,
                status_reason=self.status_reason,
            )

    async def _wait_for(self, condition: pb.WaitSandboxRequest.Condition, timeout_s: float) -> None:
        """Long-polls WaitSandbox (server-side) until `condition` holds or `timeout_s` passes."""
        await self._ensure_started()
        sandbox_id = self._require_id()
        client = await self._client()
        deadline = time.monotonic() + timeout_s if math.isfinite(timeout_s) else math.inf

        def satisfied() -> bool:
            s = self._status
            if s is None:
                return False
            return s.is_terminal or (condition == _STARTED and s.is_running)

        while not satisfied():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxTimeoutError(
                    f"sandbox {sandbox_id} did not become "
                    f"{'running' if condition == _STARTED else 'terminal'} within {timeout_s:g}s "
                    f"(status: {self._status})",
                    sandbox_id=sandbox_id,
                )
            slice_ = min(remaining, _WAIT_SLICE_SECONDS)
            request = pb.WaitSandboxRequest(
                sandbox_id=sandbox_id, condition=condition, timeout_seconds=slice_
            )
            record = await client.with_retry(
                functools.partial(
                    client.transport.wait_sandbox, request, call_timeout=slice_ + 30.0
                ),
                op="wait",
            )
            self._apply(record)

    def __await__(self) -> Generator[Any, None, Sandbox]:
        """``await sandbox``: starts it if needed and waits until RUNNING (as `wait()`)."""
        return _await_concurrent(get_bridge().submit(self._wait_started(None))).__await__()

    def get_status(self) -> SandboxStatus:
        """Blocks for one request and returns the fresh status.

        A terminal status is final and answered from the cache. Raises `SandboxNotRunningError`
        for a sandbox that was never started (it does not start it).
        """
        return get_bridge().run(self._get_status())

    async def _get_status(self) -> SandboxStatus:
        if self._status is not None and self._status.is_terminal:
            return self._status
        if self._sandbox_id is None:
            if self._start_task is None:
                raise SandboxNotRunningError("the sandbox has not been started")
            await self._ensure_started()
        sandbox_id = self._require_id()
        client = await self._client()
        record = await client.with_retry(
            lambda: client.transport.get_sandbox(sandbox_id, call_timeout=self._request_timeout),
            op="get sandbox",
        )
        self._apply(record)
        assert self._status is not None
        return self._status

    def stop(
        self,
        *,
        graceful_shutdown_seconds: float = DEFAULT_GRACEFUL_SHUTDOWN_SECONDS,
        missing_ok: bool = False,
        snapshot_on_stop: bool = False,
    ) -> OperationRef[None]:
        """Stops the sandbox; resolves once it is terminal.

        The main process gets SIGTERM, then every process SIGKILL after
        `graceful_shutdown_seconds` (default 10; 0 means at once). Idempotent: concurrent and
        repeated calls share one stop; stopping a terminal sandbox does nothing; stopping one that
        was never started just marks it stopped. `missing_ok` turns "not found" into success.
        `snapshot_on_stop` is not supported by this service (ValueError). Fire and forget is
        fine: the interpreter's exit waits (up to 10 s) for a stop in flight.
        """
        if snapshot_on_stop:
            raise ValueError("snapshot_on_stop is not supported by this service")
        if graceful_shutdown_seconds < 0:
            raise ValueError("graceful_shutdown_seconds must not be negative")
        return OperationRef._of(
            self._stop(graceful_shutdown_seconds, missing_ok), finish_at_exit=True
        )

    async def _stop(self, grace: float, missing_ok: bool) -> None:
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._do_stop(grace))
        task = self._stop_task
        try:
            await asyncio.shield(task)
        except SandboxNotFoundError:
            if not missing_ok:
                raise
        except Exception:
            if self._stop_task is task:
                self._stop_task = None  # let a later stop() try again
            raise

    async def _do_stop(self, grace: float) -> None:
        if self._status is None or not self._status.is_terminal:
            self._stop_requested = True  # (an already-ended sandbox was not stopped by us)
        try:
            if self._sandbox_id is None:
                if self._start_task is None:
                    return  # never started: nothing to stop
                try:
                    await asyncio.shield(self._start_task)
                except Exception:
                    return  # the create failed: nothing to stop
            if self._status is not None and self._status.is_terminal:
                return
            sandbox_id = self._require_id()
            client = await self._client()
            record = await client.with_retry(
                lambda: client.transport.stop_sandbox(
                    sandbox_id, grace or 0.001, call_timeout=grace + 60.0
                ),
                op="stop sandbox",
            )
            self._apply(record)
            if not (self._status and self._status.is_terminal):
                await self._wait_for(_TERMINAL, grace + 60.0)
        finally:
            if self._session is not None:
                self._session._forget(self)

    # -- context managers ----------------------------------------------------------------------

    def __enter__(self) -> Self:
        """``with sandbox:`` starts it (without waiting for RUNNING) and stops it at the end.

        A failure to stop is raised, unless an exception is already propagating (then it is
        logged, so the original error is not masked).
        """
        self.start().result()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop().result()
        except Exception:
            if exc is None:
                raise
            logger.warning("stopping sandbox %s failed", self._sandbox_id, exc_info=True)

    async def __aenter__(self) -> Self:
        """``async with sandbox:``: as ``with``, awaiting start and stop."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        except Exception:
            if exc is None:
                raise
            logger.warning("stopping sandbox %s failed", self._sandbox_id, exc_info=True)

    # -- commands ------------------------------------------------------------------------------

    def exec(
        self,
        command: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = False,
        timeout_seconds: float | None = None,
        stdin: bool = False,
        input: bytes | str | None = None,
        protected: bool = False,
        max_output_bytes: int | None = None,
    ) -> Process:
        """Runs `command` (an argv list) in the sandbox; returns a `Process` at once.

        If the sandbox is not running yet, the command waits for it (it is started if needed).
        `cwd` must be absolute (default: the sandbox's working directory). `env` is added to the
        sandbox's environment. `timeout_seconds` (default: no limit) is enforced by the service:
        the command's process group is killed and `result()` raises `SandboxTimeoutError` (with
        ``exec_result``). With `check`, a non-zero exit makes `result()` raise
        `SandboxExecutionError` carrying ``exec_result`` (after the output is complete).

        The command's stdin: with ``stdin=True``, ``process.stdin`` is a `StreamWriter` to feed
        it while it runs; with ``input=`` (bytes, or text sent as UTF-8; at most 4 MiB), it is
        that data followed by end-of-file, sent with the command in one message (as in
        `subprocess.run`; the cheaper way when the input is known up front); otherwise it is empty.
        The two cannot be combined.

        Output: ``process.stdout``/``stderr`` stream it live, in bounded memory (a reader that
        falls behind holds the command back). The `ProcessResult` keeps the first
        `max_output_bytes` of each stream (default `SandboxDefaults.max_output_bytes`, 64 MiB) and
        says when a stream was longer (``stdout_truncated``/``stderr_truncated``); the command
        runs to its end and its exit code arrives either way.

        With ``protected=True`` nothing else running in the sandbox (a process an earlier
        command left behind, say) can read, write, signal or trace the command, open its
        descriptors or memory, or change its output or exit status; it still reads and writes
        the sandbox's files and reaches its servers as any command does. Meant for checks that
        judge code running in the same sandbox; see docs/security.md for what it does not
        promise. Needs a service running as root (else `SandboxError` says so).
        """
        if isinstance(command, str | bytes):
            raise TypeError(
                f"exec() takes a list of arguments, e.g. ['sh', '-c', {command!r}], not a string"
            )
        argv = [str(a) for a in command]
        if not argv:
            raise ValueError("exec() needs a non-empty command")
        if cwd is not None and not cwd.startswith("/"):
            raise ValueError(f"cwd must be an absolute path: {cwd!r}")
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if input is not None and stdin:
            raise ValueError("exec() takes stdin=True or input=..., not both")
        data = input.encode() if isinstance(input, str) else bytes(input or b"")
        keep = (
            self._defaults.max_output_bytes
            if max_output_bytes is None
            else _defaults.byte_count("max_output_bytes", max_output_bytes)
        )
        state = ExecState(argv, stdin=stdin, max_output_bytes=keep)
        init = pb.ExecInit(
            argv=argv,
            cwd=cwd or "",
            env=dict(env or {}),
            timeout_seconds=float(timeout_seconds or 0.0),
            stdin=stdin,
            input=data,
            protected=protected,
        )
        future = get_bridge().submit(self._exec(state, init, check))
        return Process(future, state)

    async def _exec(self, state: ExecState, init: pb.ExecInit, check: bool) -> Any:
        try:
            if self._stop_requested:
                raise SandboxNotRunningError(
                    f"cannot run {shlex.join(state.command)!r}: the sandbox was stopped",
                    sandbox_id=self._sandbox_id,
                )
            await self._ensure_started()
            init.sandbox_id = self._require_id()
            client = await self._client()
            return await state.drive(client.transport, init, check=check)
        except BaseException as err:
            state.finish(
                err if isinstance(err, Exception) else SandboxError("the command was cancelled")
            )
            raise

    # -- files ---------------------------------------------------------------------------------

    def read_file(
        self,
        filepath: str,
        *,
        timeout_seconds: float | None = None,
        max_bytes: int | None = None,
    ) -> OperationRef[bytes]:
        """Reads a whole file of the sandbox into memory (streamed in 256 KiB chunks).

        At most `max_bytes` (default `SandboxDefaults.max_read_file_bytes`, 64 MiB): a larger
        file raises `SandboxFileError` naming its size and the cap, before any of it moves (and
        a file that grows past the cap while read stops there). Read big files with
        `read_file_streaming` (chunks) or `download_file` (into a local file), in bounded memory.
        Raises `SandboxFileError` (with ``filepath``) if it is missing, a directory, or
        unreadable. `timeout_seconds` defaults to `request_timeout_seconds`.
        """
        cap = None if max_bytes is None else _defaults.byte_count("max_bytes", max_bytes)
        return OperationRef._of(self._read_file(filepath, timeout_seconds, cap))

    async def _read_file(
        self, filepath: str, timeout_s: float | None, max_bytes: int | None = None
    ) -> bytes:
        await self._ensure_started()
        client = await self._client()
        return await _files.read_whole(
            client,
            self._require_id(),
            filepath,
            timeout_s or self._request_timeout,
            self._defaults.max_read_file_bytes if max_bytes is None else max_bytes,
        )

    def read_file_streaming(
        self, filepath: str, *, timeout_seconds: float | None = None
    ) -> FileStream:
        """Reads a file of the sandbox as a stream of ``bytes`` chunks, in bounded memory.

        Returns a `FileStream` at once: iterate it with ``for`` or ``async for``; each chunk is
        fetched when asked for, so a file of any size costs a chunk (256 KiB) and the
        connection's window, and a slow consumer holds the transfer back. ``close()`` it (or use
        ``with``) to stop early. Errors (`SandboxFileError` with ``filepath``) are raised by the
        iteration. `timeout_seconds` bounds the whole transfer (default: no limit).
        """
        return FileStream(filepath, lambda: self._open_read(filepath, timeout_seconds))

    def download_file(
        self,
        filepath: str,
        local_path: str | os.PathLike[str],
        *,
        timeout_seconds: float | None = None,
    ) -> OperationRef[int]:
        """Copies a file of the sandbox to `local_path` on this machine, in bounded memory;
        resolves to the number of bytes written.

        Chunks are written to a temporary file beside `local_path`, renamed into place once the
        whole file arrived: an interrupted download leaves nothing under the real name. The file
        gets the sandbox file's permission bits less set-id bits and group/other write.
        `local_path` must name a file in an existing directory (else `IsADirectoryError` or
        `FileNotFoundError`, raised here). `timeout_seconds` bounds the whole transfer (default:
        no limit). Raises `SandboxFileError` as `read_file` does.
        """
        target = _files.local_target(local_path)
        return OperationRef._of(
            _files.download(lambda: self._open_read(filepath, timeout_seconds), filepath, target)
        )

    async def _open_read(self, filepath: str, timeout_s: float | None) -> Any:
        await self._ensure_started()
        client = await self._client()
        return await _files.open_read(client, self._require_id(), filepath, timeout_s)

    def write_file(
        self,
        filepath: str,
        contents: bytes | bytearray | memoryview | str,
        *,
        mode: int | None = None,
        make_parents: bool = True,
        timeout_seconds: float | None = None,
    ) -> OperationRef[None]:
        """Writes (creates or replaces) a file in the sandbox; str contents are UTF-8 encoded.

        Streamed in 256 KiB chunks, so any size works. `mode`: permission bits (default 0o644).
        Missing parent directories are created unless `make_parents` is False. Raises
        `SandboxFileError` (with ``filepath``) on failure.
        """
        data = contents.encode() if isinstance(contents, str) else contents
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(
                f"write_file() contents must be bytes or str, not {type(data).__name__}"
            )
        return OperationRef._of(
            self._write_file(
                filepath, memoryview(data).cast("B"), mode, make_parents, timeout_seconds
            ),
            finish_at_exit=True,
        )

    async def _write_file(
        self,
        filepath: str,
        data: memoryview,
        mode: int | None,
        make_parents: bool,
        timeout_s: float | None,
    ) -> None:
        await self._ensure_started()
        client = await self._client()
        await _files.write_whole(
            client,
            self._require_id(),
            filepath,
            data,
            mode=mode or 0,
            make_parents=make_parents,
            rpc_timeout=timeout_s or self._request_timeout,
        )

    # -- class-level queries -------------------------------------------------------------------

    @classmethod
    def list(
        cls,
        *,
        tags: Sequence[str] | None = None,
        status: str | SandboxStatus | None = None,
        include_stopped: bool = False,
        base_url: str | None = None,
        timeout_seconds: float | None = None,
    ) -> OperationRef[builtins.list[Sandbox]]:
        """Finds sandboxes: those with all of `tags`, in `status` if given.

        Terminal sandboxes are left out unless `include_stopped` or `status` is a terminal status.
        All pages are fetched. The results are usable `Sandbox` objects.
        """
        tag_list = list(_defaults._as_str_tuple("tags", tags))
        wanted = SandboxStatus.parse(status) if status is not None else None
        return OperationRef._of(
            cls._list(tag_list, wanted, include_stopped, base_url, timeout_seconds)
        )

    @classmethod
    async def _list(
        cls,
        tags: builtins.list[str],
        status: SandboxStatus | None,
        include_stopped: bool,
        base_url: str | None,
        timeout_s: float | None,
    ) -> builtins.list[Sandbox]:
        url = _defaults.resolve_base_url(base_url, None)
        client = await get_client(url)
        request = pb.ListSandboxesRequest(
            tags=tags,
            include_terminated=include_stopped or bool(status and status.is_terminal),
            page_size=1000,
        )
        if status is not None:
            request.statuses.append(status.to_proto())  # type: ignore[arg-type]
        found: builtins.list[Sandbox] = []
        fetch = functools.partial(
            client.transport.list_sandboxes,
            request,
            call_timeout=timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS,
        )
        while True:
            response = await client.with_retry(fetch, op="list sandboxes")
            found.extend(cls._from_record(r, url, timeout_s) for r in response.sandboxes)
            if not response.next_page_token:
                return found
            request.page_token = response.next_page_token

    @classmethod
    def from_id(
        cls,
        sandbox_id: str,
        *,
        base_url: str | None = None,
        timeout_seconds: float | None = None,
    ) -> OperationRef[Sandbox]:
        """Attaches to an existing sandbox (also a terminal one). Raises `SandboxNotFoundError`."""
        return OperationRef._of(cls._from_id(sandbox_id, base_url, timeout_seconds))

    @classmethod
    async def _from_id(
        cls, sandbox_id: str, base_url: str | None, timeout_s: float | None
    ) -> Sandbox:
        url = _defaults.resolve_base_url(base_url, None)
        client = await get_client(url)
        timeout = timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
        record = await client.with_retry(
            lambda: client.transport.get_sandbox(sandbox_id, call_timeout=timeout), op="get sandbox"
        )
        return cls._from_record(record, url, timeout_s)

    @classmethod
    def delete(
        cls,
        sandbox_id: str,
        *,
        missing_ok: bool = False,
        base_url: str | None = None,
        timeout_seconds: float | None = None,
    ) -> OperationRef[None]:
        """Stops the sandbox if needed and removes its record. `missing_ok` ignores unknown ids."""
        return OperationRef._of(
            cls._delete(sandbox_id, missing_ok, base_url, timeout_seconds), finish_at_exit=True
        )

    @classmethod
    async def _delete(
        cls, sandbox_id: str, missing_ok: bool, base_url: str | None, timeout_s: float | None
    ) -> None:
        client = await get_client(_defaults.resolve_base_url(base_url, None))
        with contextlib.suppress(SandboxNotFoundError) if missing_ok else contextlib.nullcontext():
            timeout = timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
            await client.with_retry(
                lambda: client.transport.delete_sandbox(sandbox_id, call_timeout=timeout),
                op="delete sandbox",
            )

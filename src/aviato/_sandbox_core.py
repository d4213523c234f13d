"""`SandboxCore`: one isolated environment, its lifecycle, commands and files (the body of the
public `Sandbox`, which adds only `Sandbox.session()`; see `aviato._sandbox`).

Every method returns at once (except the few documented as blocking: `run`, `wait`,
`get_status` and the sync context manager): the work runs on the SDK's background loop and the
method returns an `OperationRef` or a `Process`. All mutable state of a Sandbox object is changed
only on that loop, so one object may be used from many threads.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import math
import time
from collections.abc import Generator
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, Self, Unpack

from aviato import _defaults
from aviato._bridge import await_concurrent as _await_concurrent
from aviato._bridge import get_bridge
from aviato._client import Client, get_client
from aviato._defaults import DEFAULT_GRACEFUL_SHUTDOWN_SECONDS
from aviato._operation import OperationRef
from aviato._options import RunOptions, SandboxArgs, SandboxDefaults, resolve
from aviato._sandbox_code import SandboxCodeContexts
from aviato._sandbox_commands import SandboxCommands
from aviato._sandbox_io import SandboxIO
from aviato._sandbox_network import SandboxNetwork
from aviato._sandbox_paths import SandboxPaths
from aviato._sandbox_pause import SandboxPausing
from aviato._sandbox_queries import SandboxQueries
from aviato._sandbox_snapshots import SandboxSnapshots
from aviato._sandbox_usage import SandboxUsageQueries
from aviato._status import SandboxStatus
from aviato._volumes import HostMount, Volume
from aviato.exceptions import (
    SandboxFailedError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)
from aviato.v1 import sandbox_pb2 as pb


class SandboxOwner(Protocol):
    """What a sandbox needs from the `Session` that owns it: its lease, a check that it is
    still open, and being told when the sandbox was created and when it ended."""

    _lease_id: str
    _lease_ttl: float

    def _check_open(self) -> None: ...

    def _on_sandbox_created(self, sandbox: SandboxCore) -> None: ...

    def _forget(self, sandbox: SandboxCore) -> None: ...


__all__ = ["SandboxCore", "SandboxOwner"]

logger = logging.getLogger("aviato")

_STARTED = pb.WaitSandboxRequest.CONDITION_STARTED
_TERMINAL = pb.WaitSandboxRequest.CONDITION_TERMINAL
_WAIT_SLICE_SECONDS = 60.0  # the service's cap per WaitSandbox call
# The defaults of a sandbox made without any: made once (they read no environment, and
# nothing changes a `SandboxDefaults` in place), not per sandbox.
_NO_DEFAULTS = SandboxDefaults()


def _ts(record: pb.Sandbox, name: str) -> datetime | None:
    if not record.HasField(name):
        return None
    stamp = getattr(record, name)
    return stamp.ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]


class SandboxCore(
    SandboxQueries,
    SandboxNetwork,
    SandboxPausing,
    SandboxSnapshots,
    SandboxIO,
    SandboxPaths,
    SandboxUsageQueries,
    SandboxCommands,
    SandboxCodeContexts,
):
    """Everything a `Sandbox` is and does but `Sandbox.session()`: its record, its lifecycle,
    and (through its bases) its commands, files and queries. Users see it as `aviato.Sandbox`,
    the subclass that `aviato._sandbox` defines beside `Session` (see that module for why)."""

    def __init__(
        self,
        *,
        defaults: SandboxDefaults | None = None,
        _session: SandboxOwner | None = None,
        **options: Unpack[SandboxArgs],
    ) -> None:
        d = defaults or _NO_DEFAULTS
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
    ) -> Self:
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
    def _from_record(cls, record: pb.Sandbox, base_url: str | None, timeout: float | None) -> Self:
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

    @property
    def secrets(self) -> builtins.list[str]:
        """The names of the secrets in its environment (docs/secrets.md); never values."""
        return list(self._spec_known().secrets)

    @property
    def resources(self) -> dict[str, str | int]:
        """Its limits as the service resolved them (its defaults for what was not asked):
        ``{"memory": "1Gi", "pids": 1024, "disk": "1Gi", "cpu": "500m"}``, no ``"cpu"`` when
        it has no cpu limit. Before the service answered: what was asked."""
        res = self._spec_known().resources
        found: dict[str, str | int] = {"cpu": res.cpu, "memory": res.memory, "pids": res.pids,
                                       "disk": res.disk}  # fmt: skip
        return {key: value for key, value in found.items() if value}

    @property
    def volumes(self) -> dict[str, Volume | HostMount]:
        """Its mounted volumes and host directories, by sandbox path (docs/volumes.md)."""
        return {
            m.path: HostMount(m.host_path) if m.host_path else Volume(m.volume, m.read_only)
            for m in self._spec_known().mounts
        }

    def _spec_known(self) -> pb.SandboxSpec:
        """The service's answer's spec (resolved), else the spec this object would send."""
        return self._record.spec if self._record is not None else self._spec

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

    def wait(self, timeout: float | None = None) -> Self:
        """Blocks until the sandbox is RUNNING (starting it if needed); returns it.

        `timeout`: None means `request_timeout_seconds` (300 s by default, as in the aviato SDK);
        ``float("inf")`` waits without limit. Raises `SandboxTimeoutError` when it passes,
        `SandboxFailedError` if the sandbox failed, `SandboxTerminatedError` if it was terminated
        and `SandboxNotRunningError` if you stopped it. Returns as well if the main process has
        already completed. In async code use ``await sandbox`` instead.
        """
        get_bridge().run(self._wait_started(timeout))
        return self

    async def _wait_started(self, wait_seconds: float | None) -> Self:
        await self._wait_for(_STARTED, self._timeout(wait_seconds))
        status = self._status
        if self._stop_requested:
            raise SandboxNotRunningError("the sandbox was stopped", sandbox_id=self._sandbox_id)
        self._raise_for_terminal(status, raise_on_termination=True)
        return self

    def wait_until_complete(
        self, timeout: float | None = None, *, raise_on_termination: bool = True
    ) -> OperationRef[Self]:
        """Resolves to the sandbox once it is terminal (its main process ended, or it was stopped).

        `timeout` as in `wait()` (None: 300 s; ``float("inf")``: no limit). A FAILED sandbox raises
        `SandboxFailedError`; a TERMINATED one raises `SandboxTerminatedError` unless
        `raise_on_termination` is False (a sandbox you stopped counts as terminated).
        """
        return OperationRef._of(self._wait_complete(timeout, raise_on_termination))

    async def _wait_complete(self, timeout_s: float | None, raise_on_termination: bool) -> Self:
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

    def __await__(self) -> Generator[Any, None, Self]:
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

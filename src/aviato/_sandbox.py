"""The public `Sandbox`, and `Session`: a group of sandboxes sharing defaults, cleaned up together.

The two classes name each other (`Sandbox.session()` makes a Session; a Session makes
Sandboxes), so they live in one module and neither module imports the other. `Sandbox` adds
only `session()` to `SandboxCore` (`aviato._sandbox_core`), which holds everything a sandbox is
and does.

A session owns the sandboxes it makes (`session.sandbox()`, its remote functions) and those it
adopts (`adopt`, `from_id`, `list(adopt=True)`), and stops them all:

- when it is closed (`close()`, or leaving ``with``/``async with``): concurrently;
- at interpreter exit (an atexit hook on the SDK's loop);
- on SIGTERM (and SIGINT) when that signal would otherwise kill the process without running
  atexit: handlers are installed lazily by the first Session created in the main thread, chain to
  the previous handlers, and are not installed for signals that are ignored. Python's default
  SIGINT handler raises KeyboardInterrupt, which unwinds through ``with`` blocks and atexit, so a
  Ctrl-C in a notebook interrupts the cell but does not stop your sandboxes;
- when the process dies without any of that (SIGKILL, OOM, power loss): each session has a lease
  that the service created with its first sandbox and that the SDK's loop renews every ttl/3
  (ttl: `AVIATO_LEASE_TTL`, default 30 s). When renewals stop, the service stops the lease's
  sandboxes after the ttl (status TERMINATED, reason "lease expired").

Sandboxes adopted from elsewhere are stopped on close/exit/signal, but are not under this
session's lease.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import logging
import os
import signal
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, ParamSpec, Self, TypeVar, Unpack, overload

from aviato import _bridge, _defaults
from aviato._client import CLEANING_UP, get_client
from aviato._function import RemoteFunction
from aviato._operation import OperationRef
from aviato._options import (
    FunctionOptions,
    SandboxDefaults,
    SandboxOptions,
    check_keys,
    check_original_only,
)
from aviato._sandbox_core import SandboxCore
from aviato._status import SandboxStatus
from aviato.exceptions import SandboxError, SandboxNotFoundError

__all__ = ["Sandbox", "Session"]

logger = logging.getLogger("aviato")

P = ParamSpec("P")
R = TypeVar("R")

_CLEANUP_TIMEOUT_SECONDS = 30.0


class Sandbox(SandboxCore):
    """A sandbox: an isolated environment that runs a main process and your commands.

    Make one with `Sandbox.run(...)` (create and start; returns once the service accepted the
    create, not when it is RUNNING), with the constructor (nothing is sent until first use or
    `start()`), or from a `Session`. Find existing ones with `Sandbox.list()` / `Sandbox.from_id()`.

    Options (the constructor's keywords; `run` takes the command positionally; `Session.sandbox`
    takes all but `base_url`): they are declared once, in `aviato._options.SandboxArgs`, whose
    list follows. The explicit value wins over `defaults` (see `SandboxDefaults`).

    Cleanup: a sandbox made by a `Session` is stopped when the session closes, at interpreter exit,
    on SIGTERM, and — if the process is killed outright — by the service when the session's lease
    expires. A bare `Sandbox.run()` outside any session is *not* tied to this process: it runs
    until stopped or until its max lifetime (1 hour by default). Use ``with Sandbox.run() as sb:``
    or a Session to tie it to your code. A `stop()`, `delete()` or `write_file()` that is still
    running when the interpreter exits is not abandoned: the exit waits for it, up to 10 s (and
    the service completes a stop it has received even if that wait ends first).
    """

    @classmethod
    def session(cls, defaults: SandboxDefaults | Mapping[str, Any] | None = None) -> Session:
        """A new `Session` with these defaults (same as ``Session(defaults)``)."""
        return Session(defaults)


class Session:
    """A group of sandboxes with shared `SandboxDefaults`, stopped together.

    ``Session(defaults)`` sends nothing; `sandbox()` returns sandboxes that start on first use.
    Use it as a context manager (``with``/``async with``), or call `close()`.

    The session stops the sandboxes it made or adopted: on `close()` (concurrently), at
    interpreter exit, and on SIGTERM/SIGINT when the signal would end the process (handlers are
    installed lazily from the main thread and chain to the previous ones; a Ctrl-C that only
    interrupts a notebook cell stops nothing). If the process is killed outright (SIGKILL), the
    service stops them once the session's lease is no longer renewed: the SDK renews it every
    ttl/3 from its background loop (ttl: `defaults.lease_ttl_seconds`, else `AVIATO_LEASE_TTL`,
    else 30 s). Adopted sandboxes are stopped on close/exit/signal but are not under the lease.
    """

    def __init__(self, defaults: SandboxDefaults | Mapping[str, Any] | None = None) -> None:
        if defaults is None:
            defaults = SandboxDefaults()
        elif isinstance(defaults, Mapping):
            defaults = SandboxDefaults.from_dict(defaults)
        elif not isinstance(defaults, SandboxDefaults):
            raise TypeError("defaults must be SandboxDefaults, a dict or None")
        self.defaults: SandboxDefaults = defaults
        self._lease_id = f"lease-{uuid.uuid4()}"
        self._lease_ttl = _defaults.lease_ttl_seconds(defaults.lease_ttl_seconds)
        self._base_url = _defaults.resolve_base_url(None, defaults.base_url)
        self._lock = threading.Lock()
        self._sandboxes: dict[int, SandboxCore] = {}
        self._closed = False
        self._close_ref: OperationRef[None] | None = None
        self._lease_used = False
        self._renew_task: asyncio.Task[None] | None = None
        self._functions: builtins.list[RemoteFunction[Any, Any]] = []
        self._pid = os.getpid()
        _register(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Session {state} sandboxes={self.sandbox_count}>"

    # -- sandboxes -----------------------------------------------------------------------------

    @property
    def sandbox_count(self) -> int:
        """Number of sandboxes this session tracks (made or adopted, and not yet stopped)."""
        with self._lock:
            return len(self._sandboxes)

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("the session is closed")

    def _track(self, sandbox: SandboxCore) -> None:
        with self._lock:
            self._check_open()
            sandbox._session = self
            self._sandboxes[id(sandbox)] = sandbox

    def _forget(self, sandbox: SandboxCore) -> None:
        with self._lock:
            self._sandboxes.pop(id(sandbox), None)

    def sandbox(self, **options: Unpack[SandboxOptions]) -> Sandbox:
        """A new sandbox with the session's defaults; it starts on first use (exec, read_file,
        write_file, wait, await, start). Raises `SandboxError` if the session is closed.

        The options are `Sandbox`'s (e.g. ``image_command=True`` to run the image's
        Entrypoint + Cmd, ``image_pull_credentials=`` for a private registry), except
        `base_url`: a session's sandboxes live on the session's service."""
        self._check_open()
        check_keys(options, SandboxOptions.__optional_keys__, "Session.sandbox")
        sandbox = Sandbox(defaults=self.defaults, _session=self, **options)
        self._track(sandbox)
        return sandbox

    def adopt(self, sandbox: Sandbox) -> None:
        """Makes the session responsible for stopping `sandbox` (e.g. one from `Sandbox.from_id`).

        Raises `SandboxError` if the session is closed, ValueError if the sandbox has no id.
        """
        self._check_open()
        if sandbox.sandbox_id is None:
            raise ValueError("only a started sandbox (one with a sandbox_id) can be adopted")
        self._track(sandbox)

    def list(
        self,
        *,
        tags: Sequence[str] | None = None,
        status: str | SandboxStatus | None = None,
        include_stopped: bool = False,
        adopt: bool = False,
        show_terminated: bool | None = None,
        runway_ids: Sequence[str] | None = None,
        tower_ids: Sequence[str] | None = None,
    ) -> OperationRef[builtins.list[Sandbox]]:
        """`Sandbox.list` filtered by the session's default tags plus `tags`.

        With `adopt`, the non-terminal results are adopted by the session. `show_terminated`,
        `runway_ids`, `tower_ids`: as in `Sandbox.list`.
        """
        check_original_only("runway_ids", runway_ids, "Session.list")
        check_original_only("tower_ids", tower_ids, "Session.list")
        include_stopped = include_stopped or bool(show_terminated)
        merged = self.defaults.merge_tags(tags)
        wanted = SandboxStatus.parse(status) if status is not None else None
        return OperationRef._of(self._list(merged, wanted, include_stopped, adopt))

    async def _list(
        self,
        tags: builtins.list[str],
        status: SandboxStatus | None,
        include_stopped: bool,
        adopt: bool,
    ) -> builtins.list[Sandbox]:
        found = await Sandbox._list(
            tags, status, include_stopped, self._base_url, self.defaults.request_timeout_seconds
        )
        if adopt:
            for sandbox in found:
                if sandbox.status is None or not sandbox.status.is_terminal:
                    self._track(sandbox)
        return found

    def from_id(self, sandbox_id: str, *, adopt: bool = True) -> OperationRef[Sandbox]:
        """`Sandbox.from_id`, adopting the sandbox into the session unless `adopt` is False."""
        return OperationRef._of(self._from_id(sandbox_id, adopt))

    async def _from_id(self, sandbox_id: str, adopt: bool) -> Sandbox:
        sandbox = await Sandbox._from_id(
            sandbox_id, self._base_url, self.defaults.request_timeout_seconds
        )
        if adopt:
            self._track(sandbox)
        return sandbox

    # -- remote functions ----------------------------------------------------------------------

    @overload
    def function(self, fn: Callable[P, R], /) -> RemoteFunction[P, R]: ...

    @overload
    def function(
        self, fn: None = None, /, **options: Unpack[FunctionOptions]
    ) -> Callable[[Callable[P, R]], RemoteFunction[P, R]]: ...

    def function(
        self,
        fn: Callable[P, R] | None = None,
        /,
        **options: Unpack[FunctionOptions],
    ) -> RemoteFunction[P, R] | Callable[[Callable[P, R]], RemoteFunction[P, R]]:
        """Decorator: run a plain Python function in this session's sandboxes.

        ``@session.function()`` (or ``@session.function``) turns ``def f(...)`` into a
        `RemoteFunction` with ``f.remote(*args, **kwargs) -> OperationRef``,
        ``f.map(items, max_concurrency=8) -> list[OperationRef]`` and ``f.local(...)``.
        See `aviato.RemoteFunction` for the rules (JSON-safe arguments and results, captured
        variables, errors, sandbox reuse).
        """

        def decorate(func: Callable[P, R]) -> RemoteFunction[P, R]:
            remote = RemoteFunction(func, self, **options)
            self._functions.append(remote)
            return remote

        if fn is not None:
            return decorate(fn)
        return decorate

    # -- lease ---------------------------------------------------------------------------------

    def _on_sandbox_created(self, sandbox: SandboxCore) -> None:
        """Loop-side: a sandbox was created under the lease; keep the lease renewed."""
        self._lease_used = True
        if self._renew_task is None and not self._closed:
            self._renew_task = asyncio.ensure_future(self._renew_lease())

    async def _renew_lease(self) -> None:
        interval = self._lease_ttl / 3.0
        client = await get_client(self._base_url)
        while not self._closed:
            await asyncio.sleep(interval)
            if self._closed:
                return
            try:
                await client.transport.renew_lease(
                    self._lease_id, self._lease_ttl, call_timeout=max(interval, 1.0)
                )
            except asyncio.CancelledError:
                raise
            except Exception as err:
                logger.warning("aviato: renewing session lease %s failed: %s", self._lease_id, err)

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> OperationRef[None]:
        """Stops every sandbox of the session concurrently, then ends its lease. Idempotent.

        Raises `SandboxError` (from an ExceptionGroup of the failures) if some could not be
        stopped; sandboxes already gone count as stopped.
        """
        with self._lock:
            if self._close_ref is None:
                self._close_ref = OperationRef._of(self._close(), finish_at_exit=True)
            return self._close_ref

    async def _close(self) -> None:
        with self._lock:
            self._closed = True
            sandboxes = list(self._sandboxes.values())
        _unregister(self)
        if self._renew_task is not None:
            self._renew_task.cancel()
        results = await asyncio.gather(
            *(sb._stop(_defaults.DEFAULT_GRACEFUL_SHUTDOWN_SECONDS, True) for sb in sandboxes),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if self._lease_used:
            with contextlib.suppress(Exception):
                client = await get_client(self._base_url)
                await client.with_retry(
                    lambda: client.transport.release_lease(
                        self._lease_id, stop_sandboxes=True, call_timeout=60.0
                    ),
                    op="release lease",
                )
        with self._lock:
            self._sandboxes.clear()
        failures = [e for e in errors if not isinstance(e, SandboxNotFoundError)]
        if failures:
            group = BaseExceptionGroup("failures while stopping sandboxes", failures)
            raise SandboxError(
                f"session close: {len(failures)} of {len(sandboxes)} sandboxes could not be stopped"
            ) from group

    def __enter__(self) -> Self:
        """``with Session(...) as session:`` closes the session (stops its sandboxes) at the end."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close().result()

    async def __aenter__(self) -> Self:
        """``async with Session(...) as session:``: as ``with``, awaiting the close."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# --- process-wide cleanup: atexit and signals ---------------------------------------------------

_open_sessions: set[Session] = set()
_registry_lock = threading.Lock()
_exit_hook_installed = False
_signals_installed = False
_cleaning_up = False


def _register(session: Session) -> None:
    global _exit_hook_installed
    with _registry_lock:
        _open_sessions.add(session)
        if not _exit_hook_installed:
            _exit_hook_installed = True
            _bridge.get_bridge().add_exit_hook(
                _close_all_sessions, order=_bridge.EXIT_ORDER_SESSIONS
            )
    _install_signal_handlers()


def _unregister(session: Session) -> None:
    with _registry_lock:
        _open_sessions.discard(session)


async def _close_all_sessions() -> None:
    """Closes every open session of this process (after a fork, only the child's own)."""
    with _registry_lock:
        sessions = [s for s in _open_sessions if s._pid == os.getpid()]
    if not sessions:
        return
    marked = CLEANING_UP.set(True)  # for the closes scheduled here (they copy the context)
    try:
        closes = [asyncio.ensure_future(s.close()) for s in sessions]
    finally:
        CLEANING_UP.reset(marked)
    done, pending = await asyncio.wait(closes, timeout=_CLEANUP_TIMEOUT_SECONDS)
    for task in pending:
        task.cancel()
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("aviato: closing a session at exit failed: %s", task.exception())


def _cleanup_now() -> None:
    """Blocking cleanup from a signal handler (main thread)."""
    bridge = _bridge.get_bridge()
    if not bridge.started or bridge.in_loop_thread():
        return
    with contextlib.suppress(BaseException):
        bridge.run(_close_all_sessions(), timeout=_CLEANUP_TIMEOUT_SECONDS + 5)


def _on_signal(previous: Any, signum: int, frame: FrameType | None) -> None:
    global _cleaning_up
    if previous is signal.SIG_DFL:
        # This signal would end the process without atexit: stop the sessions' sandboxes first,
        # then die of the same signal (so the exit status is the usual one).
        if not _cleaning_up:
            _cleaning_up = True
            _cleanup_now()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if callable(previous):
        # A Python handler (e.g. the default SIGINT one raising KeyboardInterrupt): chain to it.
        # If it ends the program, atexit stops the sandboxes.
        previous(signum, frame)


def _install_signal_handlers() -> None:
    global _signals_installed
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return
    _signals_installed = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN or previous is None:
                continue  # ignored on purpose, or owned by non-Python code
            signal.signal(sig, functools.partial(_on_signal, previous))
        except (ValueError, OSError):  # pragma: no cover - e.g. not allowed in this context
            continue

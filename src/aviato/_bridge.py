"""The background event loop: how the synchronous API runs the one async implementation.

Everything the SDK does on the network runs as coroutines on a single asyncio event loop owned by
a daemon thread named ``aviato-loop``, started on first use. Public methods schedule their
coroutine there with `asyncio.run_coroutine_threadsafe` and return at once with a handle
(`OperationRef`, `Process`) wrapping the `concurrent.futures.Future`. Then:

- sync code blocks in `future.result()` (this thread waits; the loop thread works);
- async code on *any* event loop awaits `asyncio.wrap_future(future)`, which is thread-safe;
- Jupyter works without `nest_asyncio`: the kernel's own loop is never re-entered.

Consequences that keep the implementation simple and thread-safe:

- every gRPC channel, lock and queue of the SDK lives on (and is only touched from) this loop;
  objects are created in user threads, but their mutable state changes only on the loop thread;
- blocking on a handle *from the loop thread* would deadlock, so `Bridge.run` and
  `OperationRef.result` raise `RuntimeError` there instead (internal code awaits);
- at interpreter exit, operations submitted with ``finish_at_exit=True`` (stops, deletes, file
  writes) that are still running get up to `EXIT_FINISH_SECONDS` (10 s) to complete; then the
  registered exit hooks run on the loop (sessions stop their sandboxes, then channels close),
  other tasks (commands, reads, waits) are cancelled, and the loop stops;
- after `os.fork()` the child gets a fresh loop on first use (threads do not survive a fork).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Bridge", "await_concurrent", "get_bridge"]

T = TypeVar("T")

logger = logging.getLogger("aviato")

ExitHook = Callable[[], Coroutine[Any, Any, None]]

#: Exit hooks run in ascending order: sessions (0) before the channels close (100).
EXIT_ORDER_SESSIONS = 0
EXIT_ORDER_CHANNELS = 100
#: How long the exit waits for operations submitted with ``finish_at_exit=True``.
EXIT_FINISH_SECONDS = 10.0
_EXIT_TIMEOUT_SECONDS = 30.0


class Bridge:
    """Owns the background loop thread. Use `get_bridge()`; do not construct directly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._exit_hooks: list[tuple[int, int, ExitHook]] = []
        self._hook_seq = 0
        self._shut_down = False
        self._atexit_registered = False
        self._must_finish: set[asyncio.Task[None]] = set()  # loop-side only

    # -- the loop ------------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The background loop, started on first access."""
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._loop is None:
                if self._shut_down:
                    raise RuntimeError("the aviato event loop has shut down (interpreter exiting)")
                self._start()
            assert self._loop is not None
            return self._loop

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def _run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=_run, name="aviato-loop", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread = loop, thread
        if not self._atexit_registered:
            atexit.register(self.shutdown)
            self._atexit_registered = True

    @property
    def started(self) -> bool:
        return self._loop is not None

    def in_loop_thread(self) -> bool:
        """True when called from the background loop's own thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    # -- running coroutines --------------------------------------------------------------------

    def submit(
        self, coro: Coroutine[Any, Any, T], *, finish_at_exit: bool = False
    ) -> concurrent.futures.Future[T]:
        """Schedules `coro` on the loop now; returns its thread-safe future.

        Like `asyncio.run_coroutine_threadsafe`, except that the coroutine's task settles the
        future itself the moment it has a result, so a waiting thread wakes at once rather than
        after the loop has run whatever else is ready (a finished gRPC call's trailers, say):
        ~0.05 ms of every blocking call. Cancelling the future cancels the task.

        `finish_at_exit`: the interpreter's exit waits (up to `EXIT_FINISH_SECONDS`) for this
        operation rather than cancelling it: for what a user fires and forgets at the end of a
        script and expects done (stopping or deleting a sandbox, writing a file).
        """
        try:
            loop = self.loop
        except BaseException:
            coro.close()
            raise
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def start() -> None:
            if future.cancelled():
                coro.close()
                return
            task = loop.create_task(_settle(coro, future))
            if finish_at_exit:
                self._must_finish.add(task)
                task.add_done_callback(self._must_finish.discard)
            future.add_done_callback(
                lambda f: loop.call_soon_threadsafe(task.cancel) if f.cancelled() else None
            )

        loop.call_soon_threadsafe(start)
        return future

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs `coro` on the loop and blocks this thread for its result.

        Raises RuntimeError when called from the loop thread (it would deadlock) and
        `TimeoutError` when `timeout` passes (the coroutine is then cancelled).
        """
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError(
                "a blocking aviato call was made from the aviato event loop thread; "
                "use `await` there instead"
            )
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except (concurrent.futures.TimeoutError, KeyboardInterrupt, SystemExit):
            future.cancel()  # e.g. Ctrl-C while blocked: do not leave the work running
            raise

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        """Runs `callback(*args)` on the loop thread (thread-safe)."""
        self.loop.call_soon_threadsafe(callback, *args)

    # -- exit ----------------------------------------------------------------------------------

    def add_exit_hook(self, hook: ExitHook, order: int = EXIT_ORDER_SESSIONS) -> None:
        """Registers a coroutine function run on the loop at interpreter exit."""
        with self._lock:
            self._hook_seq += 1
            self._exit_hooks.append((order, self._hook_seq, hook))

    async def _finish_started_work(self, limit: float) -> None:
        """Waits up to `limit` seconds for the operations submitted with ``finish_at_exit``
        (including those they start meanwhile, such as a stop that waits for its create)."""
        deadline = asyncio.get_running_loop().time() + limit
        while self._must_finish:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                logger.warning(
                    "aviato: %d operation(s) still running %.0fs after exit began were cancelled",
                    len(self._must_finish),
                    limit,
                )
                return
            await asyncio.wait(set(self._must_finish), timeout=remaining)

    async def _run_exit_hooks(self) -> None:
        await self._finish_started_work(EXIT_FINISH_SECONDS)
        hooks = sorted(self._exit_hooks, key=lambda h: (h[0], h[1]))
        cancelled_tasks = False
        for order, _seq, hook in hooks:
            if order >= EXIT_ORDER_CHANNELS and not cancelled_tasks:
                await self._cancel_other_tasks()
                cancelled_tasks = True
            try:
                await hook()
            except Exception:  # pragma: no cover - best effort at exit
                logger.debug("aviato exit hook failed", exc_info=True)
        if not cancelled_tasks:
            await self._cancel_other_tasks()

    @staticmethod
    async def _cancel_other_tasks() -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    def shutdown(self, timeout: float = _EXIT_TIMEOUT_SECONDS) -> None:
        """Runs the exit hooks, then stops the loop. Registered with `atexit`; idempotent."""
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive() or self.in_loop_thread():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._run_exit_hooks(), loop).result(timeout)
        except BaseException:  # pragma: no cover - best effort at exit
            logger.debug("aviato shutdown did not finish cleanly", exc_info=True)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
        with self._lock:
            self._loop = None

    def _after_fork_in_child(self) -> None:
        # The loop thread does not exist in the child; start afresh on first use.
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self._shut_down = False
        self._must_finish = set()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # Mark an exception as retrieved (a shielded future whose awaiter went away).
    if not fut.cancelled():
        fut.exception()


async def await_concurrent(future: concurrent.futures.Future[T]) -> T:
    """Awaits a thread-safe future from whatever loop is running; cancelling the awaiter does not
    cancel the future."""
    wrapped = asyncio.wrap_future(future)
    wrapped.add_done_callback(_retrieve)
    return await asyncio.shield(wrapped)


async def _settle(coro: Coroutine[Any, Any, T], future: concurrent.futures.Future[T]) -> None:
    """Runs `coro` and hands its outcome to `future` (which stays pending until then, so that
    it can be cancelled meanwhile)."""
    try:
        result = await coro
    except asyncio.CancelledError:
        future.cancel()
        raise
    except BaseException as exc:
        if future.set_running_or_notify_cancel():
            future.set_exception(exc)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
    else:
        if future.set_running_or_notify_cancel():
            future.set_result(result)


_bridge = Bridge()


def get_bridge() -> Bridge:
    """The process-wide bridge."""
    return _bridge


if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=lambda: _bridge._after_fork_in_child())

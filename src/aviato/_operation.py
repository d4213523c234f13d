"""`OperationRef`: the handle of an operation that has already started.

Every SDK operation starts immediately on the background loop (`aviato._bridge`) and returns a
handle. A handle can be:

- blocked on from any thread: ``ref.result(timeout=None)`` (alias ``ref.get()``);
- awaited from any event loop: ``await ref`` (a cancelled awaiter does not cancel the operation;
  ``ref.cancel()`` does);
- polled: ``ref.done()``.

`aviato._process.Process`, the handle of a command, is an `OperationRef` too.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

from aviato._bridge import await_concurrent as _await_concurrent
from aviato._bridge import get_bridge

__all__ = ["OperationRef"]

T = TypeVar("T")


class OperationRef(Generic[T]):
    """A lazy handle to an operation that has already started.

    ``result()``/``get()`` block for its value, ``await ref`` gives it in async code (from any
    event loop), ``done()`` polls and ``cancel()`` cancels it. If the value is never collected,
    errors are dropped silently.
    """

    __slots__ = ("_future",)

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self._future = future

    @classmethod
    def _of(cls, coro: Coroutine[Any, Any, T], *, finish_at_exit: bool = False) -> OperationRef[T]:
        """Schedules `coro` on the background loop and returns its handle (`finish_at_exit`:
        see `Bridge.submit`)."""
        return cls(get_bridge().submit(coro, finish_at_exit=finish_at_exit))

    @classmethod
    def completed(cls, value: T) -> OperationRef[T]:
        """A handle that is already done with `value`."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        future.set_result(value)
        return cls(future)

    def result(self, timeout: float | None = None) -> T:
        """Blocks until the operation finishes and returns its value (or raises its error).

        `timeout` in seconds (None: no limit); when it passes, `TimeoutError`
        (`concurrent.futures.TimeoutError`) is raised and the operation goes on. Raises
        `concurrent.futures.CancelledError` if it was cancelled. Calling this from the SDK's own
        loop thread on an unfinished operation raises RuntimeError (it would deadlock).
        """
        if not self._future.done() and get_bridge().in_loop_thread():
            raise RuntimeError(
                "OperationRef.result() would block the aviato event loop; use `await` instead"
            )
        return self._future.result(timeout)

    def get(self, timeout: float | None = None) -> T:
        """Same as `result()`."""
        return self.result(timeout)

    def done(self) -> bool:
        """True when the operation has finished (successfully, with an error, or cancelled)."""
        return self._future.done()

    def cancel(self) -> bool:
        """Cancels the operation if it has not finished; returns True if it was cancelled."""
        return self._future.cancel()

    def cancelled(self) -> bool:
        """True if the operation was cancelled."""
        return self._future.cancelled()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Blocks like `result()`, then returns the operation's exception (or None)."""
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Callable[[OperationRef[T]], object]) -> None:
        """Calls `fn(self)` when the operation finishes (in an unspecified thread)."""
        self._future.add_done_callback(lambda _f: fn(self))

    def __await__(self) -> Generator[Any, None, T]:
        return _await_concurrent(self._future).__await__()

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "pending"
        return f"<{type(self).__name__} {state}>"

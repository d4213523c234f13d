"""`aviato.wait` and `aviato.results`: block on many handles at once."""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Sequence
from typing import Any, TypeVar, overload

from aviato._bridge import get_bridge
from aviato._operation import OperationRef
from aviato._process import Process
from aviato._sandbox_core import SandboxCore

__all__ = ["Waitable", "results", "wait"]

T = TypeVar("T")

Waitable = SandboxCore | OperationRef[Any] | Process
"""What `aviato.wait` accepts: sandboxes (ready when RUNNING) and operation handles."""


def wait(
    waitables: Waitable | Sequence[Waitable],
    num_returns: int | None = None,
    timeout: float | None = None,
) -> tuple[list[Waitable], list[Waitable]]:
    """Blocks until `num_returns` of `waitables` are ready (default: all), or `timeout` passes.

    A Sandbox is ready when it is RUNNING (it is started if needed) or has ended; an
    `OperationRef`/`Process` when it has finished. Failures count as ready: their errors are
    raised by ``.result()``. Returns ``(done, pending)``: the original objects, `done` in the order
    they became ready and at most `num_returns` long. `timeout=None` waits without limit.
    """
    items: list[Waitable] = (
        [waitables] if isinstance(waitables, SandboxCore | OperationRef) else list(waitables)
    )
    if num_returns is None:
        num_returns = len(items)
    elif num_returns < 1:
        raise ValueError("num_returns must be at least 1")
    if get_bridge().in_loop_thread():
        raise RuntimeError("aviato.wait() would block the aviato event loop")
    internal: list[concurrent.futures.Future[Any]] = []
    by_future: dict[concurrent.futures.Future[Any], list[int]] = {}
    for index, item in enumerate(items):
        if isinstance(item, SandboxCore):
            future: concurrent.futures.Future[Any] = get_bridge().submit(
                item._wait_started(math.inf)
            )
            internal.append(future)
        else:
            future = item._future
        by_future.setdefault(future, []).append(index)
    done: list[Waitable] = []
    try:
        for future in concurrent.futures.as_completed(by_future, timeout=timeout):
            for index in by_future[future]:
                if len(done) < num_returns:
                    done.append(items[index])
            if len(done) >= num_returns:
                break
    except concurrent.futures.TimeoutError:
        pass
    finally:
        for future in internal:
            future.cancel()
    done_ids = {id(x) for x in done}
    pending = [x for x in items if id(x) not in done_ids]
    return done, pending


@overload
def results(refs: OperationRef[T]) -> T: ...


@overload
def results(refs: Sequence[OperationRef[T]]) -> list[T]: ...


def results(refs: OperationRef[T] | Sequence[OperationRef[T]]) -> T | list[T]:
    """The value of one handle, or the values of a sequence of handles (in order); blocks."""
    if isinstance(refs, OperationRef):
        return refs.result()
    return [ref.result() for ref in refs]

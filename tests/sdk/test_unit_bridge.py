"""The background loop bridge and OperationRef (no service)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from aviato import OperationRef
from aviato._bridge import Bridge, get_bridge


async def _value(v: object, delay: float = 0.0) -> object:
    await asyncio.sleep(delay)
    return v


async def _fail() -> None:
    raise KeyError("boom")


def test_one_daemon_loop_thread() -> None:
    bridge = get_bridge()
    assert bridge.run(_value(1)) == 1
    names = [t.name for t in threading.enumerate() if t.name == "aviato-loop"]
    assert names == ["aviato-loop"]
    thread = next(t for t in threading.enumerate() if t.name == "aviato-loop")
    assert thread.daemon


def test_work_starts_immediately_and_result_blocks() -> None:
    started = threading.Event()

    async def work() -> str:
        started.set()
        await asyncio.sleep(0.05)
        return "done"

    ref = OperationRef._of(work())
    assert started.wait(2)  # started without anyone asking for the result
    assert not ref.done()
    assert ref.result() == "done" and ref.get() == "done" and ref.done()


def test_result_timeout_raises_standard_timeout_and_keeps_going() -> None:
    ref = OperationRef._of(_value("late", 0.3))
    with pytest.raises(TimeoutError):
        ref.result(timeout=0.01)
    assert isinstance(TimeoutError(), concurrent.futures.TimeoutError)
    assert ref.result(timeout=5) == "late"


def test_errors_propagate() -> None:
    ref = OperationRef._of(_fail())
    with pytest.raises(KeyError):
        ref.result()
    assert isinstance(ref.exception(), KeyError)


def test_cancel() -> None:
    ref = OperationRef._of(_value(1, 10))
    assert ref.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        ref.result(timeout=1)
    assert ref.done() and ref.cancelled()


def test_awaitable_from_several_loops_and_threads() -> None:
    ref = OperationRef._of(_value(42, 0.1))

    async def consume() -> object:
        return await ref

    results: list[object] = []

    def worker() -> None:
        results.append(asyncio.run(consume()))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    results.append(asyncio.run(consume()))
    for t in threads:
        t.join(5)
    assert results == [42] * 5


def test_cancelled_awaiter_does_not_cancel_the_operation() -> None:
    ref = OperationRef._of(_value("kept", 0.3))

    async def impatient() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ref, 0.01)

    asyncio.run(impatient())
    assert ref.result(timeout=5) == "kept"


def test_completed_ref() -> None:
    ref = OperationRef.completed(3)
    assert ref.done() and ref.result() == 3
    assert asyncio.run(_await(ref)) == 3


async def _await(ref: OperationRef[int]) -> int:
    return await ref


def test_deadlock_guard_on_the_loop_thread() -> None:
    bridge = get_bridge()
    pending = OperationRef._of(_value(1, 1))

    async def misuse() -> list[str]:
        errors = []
        try:
            bridge.run(_value(1))
        except RuntimeError as e:
            errors.append(str(e))
        try:
            pending.result()
        except RuntimeError as e:
            errors.append(str(e))
        return errors

    errors = bridge.run(misuse())
    assert len(errors) == 2 and all("event loop" in e for e in errors)
    # a finished ref may be read anywhere
    assert OperationRef.completed(5).result() == 5


def test_bridge_run_timeout_cancels() -> None:
    bridge = get_bridge()
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        bridge.run(slow(), timeout=0.05)
    assert cancelled.wait(2)


def test_exit_hooks_run_in_order_then_loop_stops() -> None:
    bridge = Bridge()  # a private instance, not the process-wide one
    order: list[str] = []

    async def channels() -> None:
        order.append("channels")

    async def sessions() -> None:
        await asyncio.sleep(0.01)
        order.append("sessions")

    async def straggler() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            order.append("cancelled")
            raise

    bridge.add_exit_hook(channels, order=100)
    bridge.add_exit_hook(sessions, order=0)
    bridge.submit(straggler())
    time.sleep(0.05)
    thread = bridge._thread
    bridge.shutdown()
    assert order == ["sessions", "cancelled", "channels"]
    assert thread is not None and not thread.is_alive()
    bridge.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        bridge.submit(_value(1))


@pytest.mark.slow
def test_a_blocked_caller_wakes_before_the_loop_runs_other_ready_work() -> None:
    # The result is handed over by the coroutine's own task, not by a callback queued behind
    # whatever else the loop has ready (here: a callback that holds the loop for 1 s).
    async def work() -> str:
        asyncio.get_running_loop().call_soon(time.sleep, 1.0)
        return "now"

    t0 = time.monotonic()
    assert get_bridge().run(work()) == "now"
    assert time.monotonic() - t0 < 0.5
    get_bridge().run(_value(None))  # let the sleeping callback finish before the next test

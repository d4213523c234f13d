"""Waiting for something to happen, in place of a fixed sleep.

A fixed sleep is either too short on a loaded machine (a flaky test) or too long everywhere (a
slow suite). `wait_until` polls a condition until it holds or a deadline passes, and then fails
saying what it waited for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0


def wait_until(
    predicate: Callable[[], T],
    what: str,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.02,
) -> T:
    """Returns the first truthy value of `predicate()`; AssertionError after `timeout` seconds.

    The poll interval grows from `interval` to at most 0.25 s, so a quick event costs little and
    a slow one does not spin.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    what: str,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (the deadline names what it waited for)
    interval: float = 0.02,
) -> T:
    """`wait_until` inside an event loop: the predicate may be a coroutine function."""
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.25)

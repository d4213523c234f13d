"""`BridgedStream`: a stream that lives on the SDK's loop, iterated from any thread or event loop.

The one implementation behind `LogStream` and `FileStream`: the source (a transport's reader)
is opened on the SDK's loop as soon as the stream is made, and each item is fetched from it only
when asked for, so a slow consumer holds the source back and memory stays at one item. Sync
code iterates with ``for``, async code with ``async for`` (on any loop: the item is awaited
through the bridge); ``close()``, leaving ``with``/``async with``, or dropping the object ends
the source early. After the source ends, fails or is closed, iteration stops.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

from aviato._bridge import await_concurrent, get_bridge

__all__ = ["BridgedStream", "Source"]


class Source(Protocol):
    """What a stream reads from: `next()` gives an item or None at the end; `cancel()` ends it."""

    async def next(self) -> Any: ...

    def cancel(self) -> None: ...


S = TypeVar("S", bound=Source)
T = TypeVar("T")


class BridgedStream(abc.ABC, Generic[S, T]):
    """Iterates the items of a `Source` opened by `open_` (see the module docstring);
    `_item` turns what the source gives into what the stream yields."""

    def __init__(self, open_: Callable[[], Awaitable[S]]) -> None:
        self._opened = get_bridge().submit(self._open(open_))
        self._source: S | None = None
        self._closed = False

    @staticmethod
    async def _open(open_: Callable[[], Awaitable[S]]) -> S:
        return await open_()

    @abc.abstractmethod
    def _item(self, raw: Any) -> T:
        """The stream's item for what the source gave (not None)."""

    # loop-side
    async def _next(self) -> T | None:
        if self._closed:
            return None
        try:
            if self._source is None:
                self._source = await asyncio.wrap_future(self._opened)
            raw = await self._source.next()
        except BaseException:
            self._closed = True
            raise
        if raw is None:
            self._closed = True
            return None
        return self._item(raw)

    def _cancel(self) -> None:
        self._closed = True
        if self._source is not None:
            self._source.cancel()
        elif not self._opened.done():
            self._opened.cancel()
        else:
            with contextlib.suppress(BaseException):
                self._opened.result().cancel()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        item = get_bridge().run(self._next())
        if item is None:
            raise StopIteration
        return item

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        item = await await_concurrent(get_bridge().submit(self._next()))
        if item is None:
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        """Ends the stream (idempotent); iteration then stops."""
        bridge = get_bridge()
        if bridge.started:
            with contextlib.suppress(RuntimeError):
                bridge.call_soon(self._cancel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
